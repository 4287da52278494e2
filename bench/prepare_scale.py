"""`raygpt prepare` at scale: a synthetic corpus of N GB, BPE, peak RSS and throughput.

    python bench/prepare_scale.py --gb 0.5                    # jsonl (default)
    python bench/prepare_scale.py --gb 4 --format parquet --keep

Writes a corpus of documents of varied length (log-normal, 50 B .. 200 KB) made of a
synthetic vocabulary, runs `python -m raygpt.cli prepare --tokenizer bpe` on it in a
subprocess (which starts its own embedded Ray), samples the RSS of that process and of
every process under it (raylet, Ray workers) every 0.5 s, and times Hugging Face
`tokenizers` `encode_batch` on all cores over a sample of the same documents in this
process, before prepare (a BPE of the same size trained on 32 MB) and after it (with the
tokenizer prepare trained); the ratio uses their mean. Prints MB/s, tokens/s, peak RSS of the
driver and of the largest other process, and the ratio to encode_batch, for the whole run
and for the encode phase alone (after the tokenizer is trained: encode_batch is timed with
a trained tokenizer). Also CPU seconds per MB of the whole prepare (every process) beside
encode_batch's, and the load average during each part: on a shared machine MB/s follow
the other work, CPU seconds much less. The corpus and the output are deleted at the end
(--keep to keep them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------- corpus


def _vocabulary(rng, n=30_000) -> list[str]:
    syll = ["ka", "to", "ri", "an", "el", "mo", "su", "ver", "str", "on", "the", "ing", "qu",
            "ph", "ou", "ea", "is", "at", "be", "ly", "or", "un", "de", "ma", "sh", "ch"]
    words = set()
    while len(words) < n:
        k = int(rng.integers(1, 5))
        words.add("".join(syll[int(i)] for i in rng.integers(0, len(syll), k)))
    return sorted(words)


def _text_pool(rng, nbytes: int) -> str:
    """~nbytes of Zipf-distributed words with punctuation and paragraph breaks."""
    words = np.array(_vocabulary(rng))
    ranks = np.minimum(rng.zipf(1.2, size=nbytes // 5), len(words)) - 1
    toks = words[ranks].tolist()
    out, line = [], 0
    for i, w in enumerate(toks):
        out.append(w)
        r = (i * 2654435761) % 97
        if r == 0:
            out.append(".\n\n")
        elif r < 6:
            out.append(", ")
        elif r < 8:
            out.append(". ")
        else:
            out.append(" ")
    return "".join(out)


def write_corpus(root: Path, gb: float, fmt: str, seed: int = 0) -> tuple[int, int]:
    """-> (bytes of text, documents). Files of ~256 MB each."""
    rng = np.random.default_rng(seed)
    pool = _text_pool(rng, 32 << 20)
    target = int(gb * 1e9)
    file_bytes = 256 << 20
    root.mkdir(parents=True, exist_ok=True)
    total = ndocs = 0
    k = 0
    while total < target:
        docs, fb = [], 0
        while fb < min(file_bytes, target - total):
            n = int(min(200_000, max(50, rng.lognormal(7.5, 1.2))))
            s = int(rng.integers(0, len(pool) - n))
            d = pool[s:s + n].strip()
            if d:
                docs.append(d)
                fb += len(d)
        total += fb
        ndocs += len(docs)
        if fmt == "jsonl":
            with open(root / f"part-{k:04d}.jsonl", "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps({"id": ndocs, "text": d}) + "\n")
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": docs}), root / f"part-{k:04d}.parquet",
                           row_group_size=4096)
        else:
            (root / f"part-{k:04d}.txt").write_text("\n\n".join(docs), encoding="utf-8")
        k += 1
    return total, ndocs


def sample_texts(root: Path, fmt: str, nbytes: int) -> list[str]:
    """About nbytes of documents from the corpus (for the encode_batch baseline)."""
    out, got = [], 0
    for f in sorted(root.iterdir()):
        if fmt == "jsonl":
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    out.append(json.loads(line)["text"])
                    got += len(out[-1])
                    if got >= nbytes:
                        return out
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            for b in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["text"]):
                for t in b.column(0).to_pylist():
                    out.append(t)
                    got += len(t)
                    if got >= nbytes:
                        return out
        else:
            with open(f, encoding="utf-8") as fh:
                text = fh.read(nbytes - got)
            out.extend(text.split("\n\n"))
            got += len(text)
            if got >= nbytes:
                return out
    return out


# ----------------------------------------------------------------------------- RSS


def _children(pid: int) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(d))
        except OSError:
            continue
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(pid), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own threads; not its reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss_and_name(pid: int) -> tuple[int, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            st = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return 0, ""
    rss = 0
    for line in st.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, cmd[:80]


class RssSampler(threading.Thread):
    def __init__(self, root_pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.peak: dict[int, tuple[int, str]] = {}
        self.cpu: dict[int, float] = {}  # last CPU seconds seen per process
        self.loads: list[float] = []  # 1-minute load average at every sample
        self.series: list[tuple[float, int, int]] = []  # (t, driver rss, max other rss)
        self.stop = threading.Event()

    def run(self):
        t0 = time.time()
        while not self.stop.is_set():
            drv, other = 0, 0
            for p in _tree(self.root):
                rss, name = _rss_and_name(p)
                self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_seconds(p))
                if rss > self.peak.get(p, (0, ""))[0]:
                    self.peak[p] = (rss, name)
                if p == self.root:
                    drv = rss
                else:
                    other = max(other, rss)
            self.series.append((time.time() - t0, drv, other))
            self.loads.append(os.getloadavg()[0])
            if len(self.series) % 120 == 0:  # a line a minute: figures survive a cut-short run
                d = max(v[1] for v in self.series) / 2**20
                o = max(v[2] for v in self.series) / 2**20
                print(f"  rss at {time.time() - t0:.0f}s: driver peak {d:.0f} MB, largest other "
                      f"peak {o:.0f} MB (now {drv / 2**20:.0f} / {other / 2**20:.0f})", flush=True)
            self.stop.wait(self.interval)


# ----------------------------------------------------------------------------- main


def _baseline_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    """A BPE of the same kind and size as prepare's, trained on 32 MB of the sample."""
    from raygpt.data.tokenizer import train_bpe_tokenizer

    sub, got = [], 0
    for t in texts:
        sub.append(t)
        got += len(t)
        if got >= 32 << 20:
            break
    train_bpe_tokenizer(sub, vocab_size).save(path)


def hf_baseline(tok_file: Path, texts: list[str]) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    nbytes = sum(len(t.encode()) for t in texts)
    tok.encode_batch(texts[:64], add_special_tokens=False)  # warm-up
    t, c = time.time(), time.process_time()
    ntok = 0
    for i in range(0, len(texts), 4096):
        ntok += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 4096], add_special_tokens=False))
    dt, cpu = time.time() - t, time.process_time() - c
    return {"mb_s": nbytes / dt / 1e6, "tokens_s": ntok / dt, "bytes": nbytes, "seconds": dt,
            "cpu_s_per_mb": cpu / (nbytes / 1e6), "load_avg_1m": round(os.getloadavg()[0], 2)}


def _setup_seconds(log: list[str]) -> float | None:
    """Seconds from prepare's start to 'bpe tokenizer: vocab': Ray start-up, planning, BPE."""
    import re

    for line in log:
        m = re.match(r"\s*([0-9.]+)s bpe tokenizer: vocab", line)
        if m:
            return float(m.group(1))
    return None


def _encode_seconds(log: list[str]) -> float | None:
    """Seconds from 'bpe tokenizer: vocab' to 'wrote' in prepare's progress lines."""
    import re

    t = {}
    for line in log:
        m = re.match(r"\s*([0-9.]+)s (bpe tokenizer: vocab|wrote )", line)
        if m:
            t[m.group(2)] = float(m.group(1))
    if len(t) == 2:
        return round(t["wrote "] - t["bpe tokenizer: vocab"], 1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, required=True)
    ap.add_argument("--format", choices=["txt", "jsonl", "parquet"], default="jsonl")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--bpe-sample-mb", type=int, default=None,
                    help="--bpe-sample-bytes for prepare (default: prepare's own, 1/16 of the "
                         "corpus within 32..256 MiB).")
    ap.add_argument("--baseline-mb", type=int, default=48,
                    help="MB of documents encode_batch is timed on (before and after prepare).")
    ap.add_argument("--dir", default=None, help="Work directory (default: a temp dir under /work or /tmp).")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="prepare-scale-"))
    corpus, out = work / "corpus", work / "out"
    try:
        t = time.time()
        nbytes, ndocs = write_corpus(corpus, args.gb, args.format)
        print(f"corpus: {nbytes / 1e9:.2f} GB of text, {ndocs:,} documents, {args.format} "
              f"({time.time() - t:.0f}s to write)", flush=True)
        # encode_batch before and after prepare (the machine's load may change meanwhile)
        texts = sample_texts(corpus, args.format, args.baseline_mb << 20)
        tok_file = work / "baseline-tokenizer.json"
        _baseline_tokenizer(texts, args.vocab_size, tok_file)
        base_before = hf_baseline(tok_file, texts)
        print(f"encode_batch before: {base_before['mb_s']:.2f} MB/s", flush=True)
        cmd = [sys.executable, "-m", "raygpt.cli", "prepare", "--corpus", str(corpus), "--out", str(out),
               "--tokenizer", "bpe", "--vocab-size", str(args.vocab_size)]
        if args.bpe_sample_mb:
            cmd += ["--bpe-sample-bytes", str(args.bpe_sample_mb << 20)]
        t = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = RssSampler(proc.pid)
        sampler.start()
        log = []
        for line in proc.stdout:
            log.append(line.rstrip())
            print("  | " + line.rstrip(), flush=True)
        rc = proc.wait()
        wall = time.time() - t
        sampler.stop.set()
        sampler.join()
        if rc != 0:
            sys.exit(f"prepare failed (exit {rc})")
        meta = json.loads((out / "meta.json").read_text())
        ntok = meta["train_tokens"] + meta["val_tokens"]
        driver = sampler.peak.get(proc.pid, (0, ""))[0]
        others = sorted(((r, n) for p, (r, n) in sampler.peak.items() if p != proc.pid), reverse=True)
        top = others[0] if others else (0, "")
        # flat: the max RSS in the last third of the run vs the first third
        s = sampler.series
        third = max(1, len(s) // 3)
        early = max((max(d, o) for _, d, o in s[:third]), default=0)
        late = max((max(d, o) for _, d, o in s[-third:]), default=0)

        base_after = hf_baseline(out / "tokenizer.json", texts)
        print(f"encode_batch after: {base_after['mb_s']:.2f} MB/s", flush=True)
        del texts
        base = {k: (base_before[k] + base_after[k]) / 2 for k in ("mb_s", "tokens_s")}
        mbs = nbytes / wall / 1e6
        enc_s = _encode_seconds(log)
        res = {
            "gb": args.gb, "format": args.format, "documents": ndocs, "corpus_bytes": nbytes,
            "tokens": ntok, "wall_s": round(wall, 1), "mb_s": round(mbs, 2),
            "tokens_s": round(ntok / wall), "driver_peak_rss_mb": round(driver / 2**20),
            "largest_other_peak_rss_mb": round(top[0] / 2**20), "largest_other": top[1],
            "peak_rss_first_third_mb": round(early / 2**20), "peak_rss_last_third_mb": round(late / 2**20),
            "hf_encode_batch_mb_s": round(base["mb_s"], 2),
            "hf_encode_batch_mb_s_before_after": [round(base_before["mb_s"], 2), round(base_after["mb_s"], 2)], "hf_encode_batch_tokens_s": round(base["tokens_s"]),
            "ratio_vs_encode_batch": round(mbs / base["mb_s"], 3),
            # against the faster of the two encode_batch timings (the quieter moment)
            "ratio_vs_faster_encode_batch": round(mbs / max(base_before["mb_s"], base_after["mb_s"]), 3),
            # the encode phase alone (after the tokenizer is trained, to meta.json)
            "setup_s (ray start, plan, bpe training)": _setup_seconds(log),
            "encode_phase_s": enc_s, "encode_phase_mb_s": round(nbytes / enc_s / 1e6, 2) if enc_s else None,
            "encode_phase_ratio": round(nbytes / enc_s / 1e6 / base["mb_s"], 3) if enc_s else None,
            "encode_phase_ratio_vs_faster": (round(nbytes / enc_s / 1e6 / max(
                base_before["mb_s"], base_after["mb_s"]), 3) if enc_s else None),
            # CPU seconds per MB (all processes of the run; encode_batch's threads): less
            # sensitive to other work on the machine than MB/s
            "cpu_s_per_mb": round(sum(sampler.cpu.values()) / (nbytes / 1e6), 3),
            "hf_encode_batch_cpu_s_per_mb": round((base_before["cpu_s_per_mb"] + base_after["cpu_s_per_mb"]) / 2, 3),
            "cpus": os.cpu_count(),
            "load_avg_1m_during_prepare (min, mean, max)": [
                round(min(sampler.loads), 2), round(sum(sampler.loads) / len(sampler.loads), 2),
                round(max(sampler.loads), 2)] if sampler.loads else None,
            "load_avg_1m_at_encode_batch_before_after": [base_before["load_avg_1m"], base_after["load_avg_1m"]],
        }
        print(json.dumps(res, indent=2), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
