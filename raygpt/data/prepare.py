"""Corpus -> tokenizer.json + Arrow IPC token shards + meta.json, streaming, in parallel.

Output directory (a local/NFS path or a storage URI):

    out/tokenizer.json
    out/train/shard-<piece>-<k>.arrow, ...
    out/val/shard-<piece>-<k>.arrow, ...
    out/meta.json          written last: counts, tokenizer, dtype and the shard list

Each shard is an uncompressed Arrow IPC file with one column `tokens` (uint16, or uint32
when the vocabulary has more than 65536 entries) in record batches, so the loader memory-
maps it and views it as numpy without a copy.

How (see sources.py for inputs): the corpus is planned into segments of about 32 MB
(big files cut on document boundaries), grouped into pieces, and every piece is one Ray
Data task (on this machine's Ray, or across a cluster) that reads its documents in chunks
of a few MB, encodes them, and writes its own shards straight to the output. Only
counts travel back to the driver; memory per process is bounded by the chunk and segment
sizes, not by the corpus. A small corpus (one piece) runs the same code inline.

Documents: every document ends with the tokenizer's end-of-text token (when it has one:
the char tokenizer has none), in train and val alike. Split: a corpus of a few text files
(fewer than MANY_TEXT_FILES) cuts every document at (1 - val_fraction) of its bytes: the
head goes to train, the tail to val (for one file this is nanoGPT's split). Otherwise each
document goes to val with probability val_fraction, a seeded choice of whole documents.

Tokenizer: "char" (the corpus's characters: one scan pass), "bpe" (byte-level BPE trained
on a bounded sample of the corpus, `bpe_sample_bytes`), or the path of a Hugging Face
tokenizer.json (or a directory holding one), used unchanged.

Speed: on N CPUs Ray Data runs N encode tasks at once; each encodes on one thread
(tokenizers' own pool would put N threads in each task, N*N on N cores) when there are
at least 2 pieces per CPU. JSON parsing, the split choice and shard writes are ~6% of a
task's time, beside `encode_batch`.

Atomic: a local `out` is built in a temp dir beside it and renamed into place; a URI `out`
gets shards named after this run and meta.json last (one PUT), older shards removed after.
Either way a crashed prepare never looks finished and a failed one leaves `out` as it was.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from raygpt.data import sources as src_lib
from raygpt.data.sources import BadInput, Corpus, Segment, filesystem
from raygpt.data.tokenizer import (
    MIN_BPE_VOCAB,
    TOKENIZER_FILE,
    Tokenizer,
    load_tokenizer,
    split_at_pretoken_boundaries,
    tokenizer_from_json,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from raygpt.data.store import META_FILE, cache_dir, local_data_dir  # noqa: F401  (re-exported)
from raygpt.errors import UserError
from raygpt.files import is_uri, write_atomic

SPLITS = ("train", "val")
BUNDLED_NAME = "tinyshakespeare"
BUNDLED_LABEL = f"bundled:{BUNDLED_NAME}"
FORMAT_VERSION = 2
# Each split needs at least one (input, target) pair.
MIN_SPLIT_TOKENS = 2
# Texts longer than this are cut at pre-token boundaries before encode_batch (same ids):
# tokenizers encodes a 1 MiB string ~20% slower per byte than 64 KiB ones (a txt corpus
# arrives as 4 MiB chunks of one document; jsonl documents are short already).
ENCODE_CHUNK_CHARS = 64 << 10
# A corpus of this many text files or more (or any jsonl/parquet) gets whole-document val.
MANY_TEXT_FILES = 100
# BPE training sample by default: 1/16 of the corpus, within [32 MiB, 256 MiB], so that
# training stays a small fraction of the encode time at every corpus size.
BPE_SAMPLE_BYTES = 256 << 20
BPE_MIN_SAMPLE_BYTES = 32 << 20
BPE_SAMPLE_FRACTION = 16
TEXT_SUFFIXES = src_lib.TEXT_SUFFIXES

# Test hook: called with the path of every shard right after it is written (inline runs).
_after_shard: Callable[[Path], None] | None = None

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- corpus


def bundled_corpus_path() -> Path:
    return Path(str(resources.files("raygpt") / "assets" / "tinyshakespeare.txt"))


def resolve_corpus(corpus) -> Corpus:
    if corpus is None:
        return src_lib.resolve_corpus(str(bundled_corpus_path()), label=BUNDLED_LABEL)
    return src_lib.resolve_corpus(str(corpus))


def _corpus_stat(corpus: Corpus) -> str:
    """Cheap fingerprint (relative names, sizes, mtimes) to notice a changed corpus."""
    h = hashlib.sha256()
    for f in corpus.files:
        h.update(f"{f.rel}\t{f.size}\t{f.mtime_ns}\n".encode())
    return h.hexdigest()


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _val_choice(key: int, seed: int, val_fraction: float) -> bool:
    """Seeded, stable per-document coin: splitmix64 of (key, seed)."""
    z = (key * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    z ^= z >> 31
    return z < val_fraction * 2**64


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_to_str(tok: Tokenizer) -> str:
    return json.dumps(tok.to_dict()) if tok.kind == "char" else tok.to_str()


_TOK_CACHE: dict[str, Tokenizer] = {}


def _cached_tokenizer(tok_json: str) -> Tokenizer:
    key = hashlib.sha256(tok_json.encode()).hexdigest()
    tok = _TOK_CACHE.get(key)
    if tok is None:
        tok = _TOK_CACHE[key] = tokenizer_from_json(tok_json)
    return tok


def _tokenizer_file(spec: str) -> Path:
    p = Path(spec).expanduser()
    return p / TOKENIZER_FILE if p.is_dir() else p


# ----------------------------------------------------------------------------- workers


class _ShardStream:
    """Token arrays -> out/<split>/shard-<piece>-<k>.arrow, a new file every shard_tokens."""

    def __init__(self, out: str, split: str, name: str, dtype: str, shard_tokens: int):
        self.fs, self.base = filesystem(out)
        self.split, self.name, self.dtype, self.shard_tokens = split, name, np.dtype(dtype), shard_tokens
        self.files: list[list] = []  # [relative name, tokens]
        self._sink = self._writer = None
        self._in_file = 0

    def add(self, tokens: np.ndarray) -> None:
        import pyarrow as pa

        while len(tokens):
            if self._writer is None:
                rel = f"{self.split}/shard-{self.name}-{len(self.files):04d}.arrow"
                self.fs.create_dir(f"{self.base}/{self.split}", recursive=True)
                self._sink = self.fs.open_output_stream(f"{self.base}/{rel}")
                self._writer = pa.ipc.new_file(self._sink, pa.schema([("tokens", pa.from_numpy_dtype(self.dtype))]))
                self.files.append([rel, 0])
                self._in_file = 0
            take = min(len(tokens), self.shard_tokens - self._in_file)
            part = np.ascontiguousarray(tokens[:take], dtype=self.dtype)
            self._writer.write_batch(pa.record_batch([pa.array(part)], names=["tokens"]))
            self._in_file += take
            self.files[-1][1] += take
            tokens = tokens[take:]
            if self._in_file >= self.shard_tokens:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
            if _after_shard is not None and not is_uri(self.base):
                _after_shard(Path(self.base) / self.files[-1][0])

    def close(self) -> None:
        self._close_file()


class _PieceEncoder:
    """Encodes the segments of one piece and writes its shards; one per task."""

    def __init__(self, opts: dict, piece: int, srcs: dict):
        self.o = opts
        self.tok = _cached_tokenizer(opts["tok_json"])
        self.dtype = np.dtype(opts["dtype"])
        self.srcs = srcs
        name = f"{opts['run']}{piece:05d}" if opts["run"] else f"{piece:05d}"
        self.streams = {s: _ShardStream(opts["out"], s, name, opts["dtype"], opts["shard_tokens"])
                        for s in SPLITS}
        self.docs = {s: 0 for s in SPLITS}
        self.known = set(getattr(self.tok, "chars", []))
        self.dropped = 0
        self.bad_files: list[str] = []

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        tok = self.tok
        if tok.kind == "char":
            out = []
            for t in texts:
                if self.o["unknown"] == "drop":
                    bad = set(t) - self.known
                    if bad:
                        n = len(t)
                        t = t.translate({ord(c): None for c in bad})
                        self.dropped += n - len(t)
                out.append(tok.encode_np(t))
            return out
        # Long texts cut at pre-token boundaries: encode_batch spreads them over threads and
        # encodes short strings faster per byte.
        chunks, owner = [], []
        for i, t in enumerate(texts):
            for c in split_at_pretoken_boundaries(t, ENCODE_CHUNK_CHARS):  # [t] when short
                chunks.append(c)
                owner.append(i)
        encs = _encode_batch(tok.tok, chunks) if chunks else []
        if len(owner) == len(texts):  # no text was cut: one encoding per text
            return [np.asarray(e.ids, dtype=self.dtype) for e in encs]
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for i, e in zip(owner, encs):
            parts[i].append(np.asarray(e.ids, dtype=self.dtype))
        return [np.concatenate(p) if len(p) != 1 else p[0] for p in parts]

    def _segment(self, src, seg: Segment) -> dict:
        """-> {split: [arrays]} for this segment, written through unless held for skip."""
        hold = self.o["skip_bad_files"]
        held: dict[str, list] = {s: [] for s in SPLITS}
        docs = {s: 0 for s in SPLITS}
        eos = None if self.tok.eos_id is None else np.asarray([self.tok.eos_id], dtype=self.dtype)
        seed, vf = self.o["seed"], self.o["val_fraction"]
        for batch in src_lib.read_segment(src, seg, self.o["text_field"], val_fraction=vf):
            ids_list = self._encode_texts([d.text for d in batch])
            out: dict[str, list] = {s: [] for s in SPLITS}
            for d, ids in zip(batch, ids_list):
                split = d.split or ("val" if _val_choice(d.key, seed, vf) else "train")
                part = out[split]
                if len(ids):
                    part.append(ids)
                if d.end:
                    if eos is not None:
                        part.append(eos)
                    docs[split] += 1
            for s in SPLITS:
                if out[s]:
                    arr = np.concatenate(out[s]).astype(self.dtype, copy=False)
                    (held[s].append(arr) if hold else self.streams[s].add(arr))
        for s in SPLITS:
            for arr in held[s]:
                self.streams[s].add(arr)
            self.docs[s] += docs[s]
        return docs

    def run(self, segs: list[Segment]) -> dict:
        error = ""
        try:
            for seg in segs:
                src = self.srcs[seg.file]
                try:
                    self._segment(src, seg)
                except BadInput as e:
                    if not self.o["skip_bad_files"]:
                        error = str(e)
                        break
                    self.bad_files.append(e.file)
                except UserError as e:  # e.g. a character the char tokenizer lacks
                    error = f"{src.uri}: {e}"
                    break
        finally:
            for s in self.streams.values():
                s.close()
        return {"error": error, "bad_files": json.dumps(sorted(set(self.bad_files))),
                "shards": json.dumps({s: self.streams[s].files for s in SPLITS}),
                "docs": json.dumps(self.docs), "dropped": self.dropped}


def _piece_rows(pieces: list[list[Segment]], corpus: Corpus) -> list[dict]:
    from dataclasses import asdict

    rows = []
    for k, segs in enumerate(pieces):
        files = sorted({s.file for s in segs})
        nbytes = sum(s.end - s.start if corpus.files[s.file].fmt != "parquet" and s.end >= 0
                     else corpus.files[s.file].size for s in segs)
        rows.append({"piece": k, "segs": src_lib.segments_to_json(segs), "bytes": nbytes,
                     "srcs": json.dumps({str(i): asdict(corpus.files[i]) for i in files})})
    return rows


def _srcs(row) -> dict:
    return {int(i): src_lib.Source(**d) for i, d in json.loads(row["srcs"]).items()}


def _encode_batch(hf_tok, texts: list[str]):
    """Encodings of `texts` (ids only: encode_batch_fast skips the char offsets that
    prepare does not use, where this tokenizers version has it)."""
    fast = getattr(hf_tok, "encode_batch_fast", None)
    return (fast or hf_tok.encode_batch)(texts, add_special_tokens=False)


@contextmanager
def _one_tokenizer_thread(on: bool):
    """Ray Data runs one encode task per CPU (num_cpus=1), so each task encodes on its own
    thread: left alone, tokenizers would run a rayon pool over all cores in every task
    (2 tasks x 2 threads on 2 cores measured slower than 2 x 1). tokenizers reads
    TOKENIZERS_PARALLELISM at every encode_batch call; restored after, as Ray reuses
    the worker process."""
    if not on:
        yield
        return
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _encode_row(row: dict, opts: dict) -> dict:
    with _one_tokenizer_thread(opts.get("one_thread", False)):
        res = _PieceEncoder(opts, int(row["piece"]), _srcs(row)).run(
            src_lib.segments_from_json(row["segs"]))
    return {"piece": row["piece"], **res}


def _chars_row(row: dict, opts: dict) -> dict:
    chars: set[str] = set()
    bad, error = [], ""
    srcs = _srcs(row)
    for seg in src_lib.segments_from_json(row["segs"]):
        try:
            for batch in src_lib.read_segment(srcs[seg.file], seg, opts["text_field"],
                                              val_fraction=opts["val_fraction"]):
                for d in batch:
                    chars.update(d.text)
        except BadInput as e:
            if not opts["skip_bad_files"]:
                error = str(e)
                break
            bad.append(e.file)
    return {"piece": row["piece"], "chars": "".join(sorted(chars)), "error": error,
            "bad_files": json.dumps(bad)}


class _RayStart:
    """ray.init on a thread: Ray starts up (5-15 s here) while the driver plans the corpus
    and trains BPE, which need no Ray. `get()` waits for it. Ray then cannot install its
    SIGTERM handler (main thread only), so the same one (exit, which disconnects and stops
    the embedded Ray) is installed here first. The thread lives until `close()`: Ray's
    processes die with the thread that started them (PR_SET_PDEATHSIG is per thread)."""

    def __init__(self):
        import ray

        self.mod, self.started, self.error = ray, False, None
        self.thread = None
        self.ready, self.done = threading.Event(), threading.Event()
        if ray.is_initialized():
            return
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        self.thread = threading.Thread(target=self._init, name="raygpt-ray-init", daemon=True)
        self.thread.start()

    def _init(self) -> None:
        from raygpt.raycompat import RAY_WORKER_LOGGER

        worker_log = logging.getLogger(RAY_WORKER_LOGGER)  # "SIGTERM handler is not set"
        level = worker_log.level
        worker_log.setLevel(logging.ERROR)
        try:
            # RAY_ADDRESS joins a cluster; else a fresh embedded instance ("local"), never
            # a cluster that some `ray start` on this machine happens to have recorded.
            self.mod.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                          configure_logging=False)
            self.started = True
        except BaseException as e:  # noqa: BLE001 - re-raised by get() on the main thread
            self.error = e
        finally:
            worker_log.setLevel(level)
            self.ready.set()
        self.done.wait()

    def get(self):
        if self.thread is not None:
            self.ready.wait()
        if self.error is not None:
            raise self.error
        return self.mod

    def close(self) -> None:
        """Waits for a start still running, stops the Ray started here, ends the thread."""
        if self.thread is None:
            return
        self.ready.wait()
        try:
            if self.started:
                self.mod.shutdown()
        finally:
            self.done.set()
            self.thread.join()
            self.thread = None


@contextmanager
def _ray_data():
    """A Ray being started (only if none is running) and a quiet Ray Data context; yields
    a _RayStart whose get() waits for Ray."""
    from ray.data import DataContext

    start = _RayStart()
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    data_logger = logging.getLogger("ray.data")  # we print our own progress lines
    saved_level = data_logger.level
    data_logger.setLevel(max(logging.ERROR, saved_level))
    try:
        yield start
    finally:
        ctx.enable_progress_bars = saved
        data_logger.setLevel(saved_level)
        start.close()


def _run_pieces(fn, rows: list[dict], opts: dict, ray, log: Log, what: str):
    """fn(row, opts) for every piece: inline, or one Ray Data task per piece. Yields results
    as they come (the caller stops at the first error)."""
    if ray is None:
        for r in rows:
            yield fn(r, opts)
        return
    # Biggest pieces first (pieces are numbered in corpus order, so the output is the same):
    # the small remainders of files come last, where fewer tasks than CPUs are left.
    rows = sorted(rows, key=lambda r: -r.get("bytes", 0))
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(fn, fn_kwargs={"opts": opts}, num_cpus=1)
    done, t_last = 0, time.time()
    for r in ds.iter_rows():
        done += 1
        if time.time() - t_last > 10 or done == len(rows):
            t_last = time.time()
            log(f"{what}: {done}/{len(rows)} pieces")
        yield r


# ----------------------------------------------------------------------------- prepare


class _Build:
    """One prepare run: plan -> tokenizer -> encode -> meta, writing into `target`."""

    def __init__(self, corpus: Corpus, target: str, run: str, opts: dict, ray, log: Log):
        self.corpus, self.target, self.run, self.o, self.ray, self.log = corpus, target, run, opts, ray, log
        self.bad_files: set[str] = set()

    @property
    def ray(self):
        """The ray module (waits for a Ray still starting), or None: inline."""
        return self._ray.get() if isinstance(self._ray, _RayStart) else self._ray

    @ray.setter
    def ray(self, value) -> None:
        self._ray = value

    def _on_bad(self, e: BadInput) -> None:
        self.bad_files.add(e.file)

    def plan(self) -> list[list[Segment]]:
        c = self.corpus
        self.tail = all(f.fmt == "txt" for f in c.files) and len(c.files) < MANY_TEXT_FILES
        segs = src_lib.plan_segments(c, self.tail, self.o["val_fraction"], self.o["text_field"],
                                     self.o["segment_bytes"],
                                     on_bad=self._on_bad if self.o["skip_bad_files"] else None)
        return src_lib.group_segments(segs, c, self.o["segment_bytes"])

    def tokenizer(self, pieces, rows) -> Tokenizer:
        kind = self.o["tokenizer"]
        if kind == "char":
            chars: set[str] = set()
            for r in _run_pieces(_chars_row, rows, self.o, self.ray, self.log, "char scan"):
                self._check(r)
                chars.update(r["chars"])
            if not chars:
                raise self._empty()
            return train_char_tokenizer("".join(chars))
        if kind == "bpe":
            sample = self.o["bpe_sample_bytes"] or default_bpe_sample_bytes(self.corpus.total_bytes)
            self.log(f"training byte-level BPE (vocab {self.o['vocab_size']}) on up to "
                     f"{sample / 1e6:.0f} MB of {self.corpus.total_bytes / 1e6:.1f} MB")
            tok = train_bpe_tokenizer(self._sample(pieces, sample), self.o["vocab_size"])
            if self.sampled == 0:
                raise self._empty()
            return tok
        return load_tokenizer(_tokenizer_file(kind))

    def _sample(self, pieces, budget: int):
        """Texts from the start of every piece, about budget / len(pieces) bytes each."""
        self.sampled = 0
        quota = max(1 << 16, budget // max(1, len(pieces)))
        for segs in pieces:
            got = 0
            for t in self._piece_texts(segs):
                yield t
                got += len(t)
                self.sampled += len(t)
                if got >= quota or self.sampled >= budget:
                    break
            if self.sampled >= budget:
                return

    def _piece_texts(self, segs):
        for seg in segs:
            try:
                for batch in src_lib.read_segment(self.corpus.files[seg.file], seg, self.o["text_field"],
                                                  val_fraction=self.o["val_fraction"]):
                    for d in batch:
                        yield from split_at_pretoken_boundaries(d.text, 1 << 20)
            except BadInput as e:
                if not self.o["skip_bad_files"]:
                    raise
                self.bad_files.add(e.file)

    def _empty(self) -> UserError:
        c = self.corpus
        if c.is_dir:
            return UserError(f"corpus directory {c.label} has no text: all its "
                             f"{len(c.files)} text files are empty")
        return UserError(f"corpus file {c.files[0].uri if c.label == BUNDLED_LABEL else c.label} "
                         f"is empty")

    def _check(self, r: dict) -> None:
        if r["error"]:
            raise UserError(r["error"])
        self.bad_files.update(json.loads(r["bad_files"]))

    def _one_thread(self, pieces: int) -> bool:
        """One tokenizer thread per task when there are pieces enough to keep every CPU
        busy (>= 2 per CPU); with fewer, each task's rayon pool uses the idle cores."""
        if self.ray is None:
            return False
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return pieces >= 2 * cpus

    def encode(self, rows, tok: Tokenizer) -> dict:
        opts = {**self.o, "tok_json": _tokenizer_to_str(tok), "dtype": dtype_for_vocab(tok.vocab_size),
                "out": self.target, "run": self.run, "one_thread": self._one_thread(len(rows))}
        results = []
        for r in _run_pieces(_encode_row, rows, opts, self.ray, self.log, "encode"):
            self._check(r)
            results.append(r)
        results.sort(key=lambda r: r["piece"])
        shards = {s: [] for s in SPLITS}
        docs = {s: 0 for s in SPLITS}
        dropped = 0
        for r in results:
            for s, files in json.loads(r["shards"]).items():
                shards[s] += [{"file": f, "tokens": n} for f, n in files]
            for s, n in json.loads(r["docs"]).items():
                docs[s] += n
            dropped += int(r["dropped"])
        return {"shards": shards, "docs": docs, "dropped": dropped, "dtype": opts["dtype"]}

    def build(self) -> dict:
        t0 = time.time()
        c = self.corpus
        self.log(f"reading {len(c.files)} file{'s' * (len(c.files) != 1)} "
                 f"({c.total_bytes / 1e6:.1f} MB) from {c.label}"
                 + (" with Ray Data" if self._ray is not None else ""))
        pieces = self.plan()
        if not pieces:
            raise self._empty()
        rows = _piece_rows(pieces, c)
        tok = self.tokenizer(pieces, rows)
        self.log(f"{tok.kind} tokenizer: vocab {tok.vocab_size} ({time.time() - t0:.1f}s)")
        fs, base = filesystem(self.target)
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base}/{TOKENIZER_FILE}") as f:
            if self.o["tokenizer"] in ("char", "bpe"):
                f.write((_tokenizer_to_str(tok) if tok.kind == "bpe" else
                         json.dumps(tok.to_dict(), ensure_ascii=False)).encode() + b"\n")
            else:  # a given tokenizer.json is copied byte for byte
                f.write(_tokenizer_file(self.o["tokenizer"]).read_bytes())
        enc = self.encode(rows, tok)
        n = {s: sum(x["tokens"] for x in enc["shards"][s]) for s in SPLITS}
        if n["train"] + n["val"] == 0:
            raise self._empty()
        if n["train"] < MIN_SPLIT_TOKENS or n["val"] < MIN_SPLIT_TOKENS:
            hint = ("" if self.tail else f" ({enc['docs']['val']} of "
                    f"{enc['docs']['train'] + enc['docs']['val']} documents went to val)")
            raise UserError(
                f"corpus {c.label} is too small for val_fraction={self.o['val_fraction']}: train "
                f"gets {n['train']} and val {n['val']} tokens{hint}, each split needs at least "
                f"{MIN_SPLIT_TOKENS}")
        if self.bad_files:
            self.log(f"skipped {len(self.bad_files)} bad file{'s' * (len(self.bad_files) != 1)}: "
                     + ", ".join(sorted(self.bad_files)[:5]) + (" ..." if len(self.bad_files) > 5 else ""))
        extra = {}
        if self.o["tokenizer"] not in ("char", "bpe"):
            tf = _tokenizer_file(self.o["tokenizer"])
            extra = {"tokenizer_from": str(tf), "tokenizer_fingerprint": _fingerprint(tf)}
        return build_meta(
            tok, n["train"], n["val"], {s: len(enc["shards"][s]) for s in SPLITS}, enc["dtype"],
            self.o["shard_tokens"], self.o["val_fraction"], c,
            shards=enc["shards"], documents=enc["docs"],
            split=("per document: first (1 - val_fraction) of its bytes -> train, rest -> val"
                   if self.tail else f"whole documents, seeded choice (seed {self.o['seed']})"),
            text_field=self.o["text_field"], skipped_files=len(self.bad_files),
            dropped_chars=enc["dropped"], **extra)


def _fingerprint(path: Path) -> str:
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def default_bpe_sample_bytes(corpus_bytes: int) -> int:
    return min(BPE_SAMPLE_BYTES, max(BPE_MIN_SAMPLE_BYTES, corpus_bytes // BPE_SAMPLE_FRACTION))


def _check_options(tokenizer: str, vocab_size: int, val_fraction: float, shard_tokens: int,
                   unknown: str) -> None:
    if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"vocab_size={vocab_size} is too small for the BPE tokenizer "
                        f"(at least {MIN_BPE_VOCAB}: 256 bytes + <|endoftext|>)")
    if tokenizer not in ("char", "bpe"):
        f = _tokenizer_file(tokenizer)
        if not f.is_file():
            raise UserError(f"unknown tokenizer {tokenizer!r}: use 'char', 'bpe' or the path of "
                            f"a tokenizer.json")
        load_tokenizer(f)  # a file that is not a tokenizer fails here, before any work
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be at least 1")
    if unknown not in ("error", "drop"):
        raise UserError(f"unknown={unknown!r}: use 'error' or 'drop'")


def prepare_corpus(
    corpus: str | os.PathLike | None,
    out: str | os.PathLike,
    tokenizer: str = "char",
    vocab_size: int = 2048,
    val_fraction: float = 0.1,
    shard_tokens: int = 50_000_000,
    use_ray: bool | None = None,
    *,
    text_field: str = "text",
    bpe_sample_bytes: int | None = None,
    skip_bad_files: bool = False,
    seed: int = 0,
    unknown: str = "error",
    segment_bytes: int = src_lib.SEGMENT_BYTES,
    overwrite: bool = True,
    log: Log | None = None,
) -> dict:
    """Tokenize `corpus` (None = bundled tinyshakespeare; a file, directory, glob or URI)
    into `out` (a path or URI) and return its meta dict. tokenizer: "char", "bpe" (trained
    on up to bpe_sample_bytes, None = default_bpe_sample_bytes; vocab_size) or a tokenizer.json path. use_ray None = Ray Data
    when the corpus makes more than one piece. unknown="drop" removes characters a given
    char tokenizer lacks (counted in meta). overwrite=False keeps an `out` that exists
    meanwhile (another process prepared it) and returns its meta."""
    log = log or (lambda _msg: None)
    t0 = time.time()
    tokenizer = str(tokenizer)
    _check_options(tokenizer, vocab_size, val_fraction, shard_tokens, unknown)
    c = resolve_corpus(corpus)
    out_s = str(out)
    remote = is_uri(out_s)
    if not remote:
        outp = Path(out_s).expanduser().absolute()
        _check_out(outp)
    opts = {"tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction,
            "shard_tokens": shard_tokens, "text_field": text_field,
            "bpe_sample_bytes": bpe_sample_bytes, "skip_bad_files": skip_bad_files, "seed": seed,
            "unknown": unknown, "segment_bytes": segment_bytes}

    def build(target: str, run: str) -> dict:
        b = _Build(c, target, run, opts, None, log)
        pieces_guess = c.total_bytes > segment_bytes * 1.5 or len(c.files) > 1
        if use_ray or (use_ray is None and pieces_guess):
            with _ray_data() as start:
                b.ray = start
                return b.build()
        return b.build()

    if remote:
        meta = _prepare_remote(out_s, build, overwrite, log)
    else:
        outp.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outp.name}.tmp-", dir=outp.parent))
        try:
            meta = build(str(tmp), "")
            _write_meta(str(tmp), meta)
            if not _install(tmp, outp, overwrite):
                shutil.rmtree(tmp, ignore_errors=True)
                log(f"{outp} was prepared meanwhile by someone else: keeping it")
                return read_meta(outp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wrote {out_s} in {time.time() - t0:.1f}s")
    return meta


def _write_meta(target: str, meta: dict) -> None:
    """meta.json last, atomically (local: temp + rename; object stores: one PUT)."""
    data = (json.dumps(meta, indent=2) + "\n").encode()
    if not is_uri(target):
        write_atomic(Path(target) / META_FILE, data)
        return
    fs, base = filesystem(target)
    with fs.open_output_stream(f"{base}/{META_FILE}") as f:
        f.write(data)


def _prepare_remote(out: str, build, overwrite: bool, log: Log) -> dict:
    import pyarrow.fs as pafs

    fs, base = filesystem(out)
    try:
        has_meta = fs.get_file_info(f"{base}/{META_FILE}").type == pafs.FileType.File
    except Exception as e:  # noqa: BLE001
        raise UserError(f"output {out} is unreachable: {src_lib._first_line(e)}") from None
    if has_meta and not overwrite:
        return read_meta(out)
    run = f"{uuid.uuid4().hex[:8]}-"
    try:
        meta = build(out, run)
        _write_meta(out, meta)
    except BaseException:
        _remove_run_shards(fs, base, lambda name: name.startswith(f"shard-{run}"))
        raise
    keep = {x["file"].rsplit("/", 1)[-1] for s in SPLITS for x in meta["shards"][s]}
    _remove_run_shards(fs, base, lambda name: name not in keep)  # an older prepare's shards
    return meta


def _remove_run_shards(fs, base: str, which) -> None:
    import pyarrow.fs as pafs

    for s in SPLITS:
        try:
            infos = fs.get_file_info(pafs.FileSelector(f"{base}/{s}", allow_not_found=True))
            for fi in infos:
                if fi.type == pafs.FileType.File and which(fi.base_name):
                    fs.delete_file(fi.path)
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UserError(f"output directory {out} exists and is not a raygpt data directory "
                        f"(no {META_FILE}): refusing to replace it")


def _install(tmp: Path, out: Path, overwrite: bool) -> bool:
    """Rename tmp to out. Returns False when out exists and overwrite is False (tmp kept)."""
    olds: list[Path] = []
    try:
        for _ in range(20):
            try:
                os.replace(tmp, out)  # succeeds when out is absent or an empty directory
                return True
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    if olds and not out.exists():
                        os.replace(olds.pop(), out)  # put the previous data back
                    raise
            if not overwrite:
                return False
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(out, old)
                olds.append(old)
            except FileNotFoundError:
                pass
        raise UserError(f"could not move the prepared data into {out}: it keeps being recreated")
    finally:
        for o in olds:
            shutil.rmtree(o, ignore_errors=True)


def build_meta(tok, n_train: int, n_val: int, num_shards: dict, dtype: str, shard_tokens: int,
               val_fraction: float, corpus: Corpus, **extra) -> dict:
    """meta.json of a prepared dataset."""
    return {
        "format_version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.kind,
        "eos_id": tok.eos_id,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "num_shards": num_shards,
        "dtype": dtype,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "corpus": corpus.label,
        "corpus_files": len(corpus.files),
        "corpus_bytes": corpus.total_bytes,
        "corpus_stat": _corpus_stat(corpus),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a prepared data directory (`path` = the directory, the file, or a URI)."""
    s = str(path)
    if is_uri(s):
        fs, base = filesystem(s)
        f = base if base.endswith(".json") else f"{base.rstrip('/')}/{META_FILE}"
        try:
            with fs.open_input_stream(f) as fh:
                text = fh.read().decode("utf-8")
        except FileNotFoundError:
            raise UserError(f"{s} has no {META_FILE}: run `raygpt prepare --out {s}`") from None
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{s} is unreachable: {src_lib._first_line(e)}") from None
        label = f"{s}/{META_FILE}"
    else:
        p = Path(s).expanduser()
        fp = p / META_FILE if p.is_dir() or not p.suffix else p
        if not fp.is_file():
            raise UserError(f"{p} has no {META_FILE}: run `raygpt prepare --out {p}`")
        text, label = fp.read_text(encoding="utf-8"), str(fp)
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise UserError(f"{label} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise UserError(f"{label} is not a raygpt meta.json (no vocab_size)")
    return meta


# ----------------------------------------------------------------------------- cache


def _cache_key(data_cfg) -> str:
    if data_cfg.corpus is None:
        name = BUNDLED_NAME
    else:
        c = str(data_cfg.corpus)
        p = c if is_uri(c) else str(Path(c).expanduser().absolute())
        stem = Path(p.rstrip("/").split("/")[-1]).stem.replace("*", "") or "corpus"
        name = f"{stem}-{hashlib.sha256(p.encode()).hexdigest()[:8]}"
    tok = data_cfg.tokenizer
    if tok not in ("char", "bpe"):
        tok = "tok" + _fingerprint(_tokenizer_file(tok))[:12]
    key = f"{name}-{tok}"
    if data_cfg.tokenizer == "bpe":
        key += f"-{data_cfg.bpe_vocab_size}"
    if data_cfg.val_fraction != 0.1:
        key += f"-val{data_cfg.val_fraction:g}"
    if getattr(data_cfg, "text_field", "text") != "text":
        key += f"-{data_cfg.text_field}"
    return key


def ensure_data(data_cfg, log: Log | None = None) -> Path:
    """The prepared data directory (or URI) for a DataConfig.

    data.path set: it must hold meta.json (its tokenizer wins over data.tokenizer); a
    storage URI gives its node-local cache dir (shards follow on demand, see loader).
    data.path None: the bundled corpus (or data.corpus) is prepared once into
    `$RAYGPT_CACHE_DIR` (default ~/.cache/raygpt) /data/<corpus>-<tokenizer>[-<vocab>]
    and reused; it is prepared again when the corpus files changed (size or mtime).
    Safe when several processes do it at once: each writes its own temp dir, the first
    rename wins and the others keep its result."""
    if data_cfg.path:
        if is_uri(data_cfg.path):
            return local_data_dir(data_cfg.path)  # meta + tokenizer in this node's cache
        p = Path(data_cfg.path).expanduser()
        if not (p / META_FILE).is_file():
            raise UserError(f"data.path '{data_cfg.path}' has no {META_FILE}: "
                            f"run `raygpt prepare --out {data_cfg.path}`")
        return p
    c = resolve_corpus(data_cfg.corpus)
    target = cache_dir() / "data" / _cache_key(data_cfg)
    overwrite = False
    if (target / META_FILE).is_file():
        try:
            meta = read_meta(target)
        except UserError:
            meta = {}
        if meta.get("corpus_stat") == _corpus_stat(c):
            return target
        overwrite = True  # corpus changed (or unreadable meta): prepare again
    prepare_corpus(data_cfg.corpus, target, tokenizer=data_cfg.tokenizer,
                   vocab_size=data_cfg.bpe_vocab_size, val_fraction=data_cfg.val_fraction,
                   text_field=getattr(data_cfg, "text_field", "text"),
                   overwrite=overwrite, log=log)
    return target
