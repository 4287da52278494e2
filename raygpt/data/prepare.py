"""Text corpus -> tokenizer.json + Arrow IPC token shards + meta.json.

Output directory:

    out/tokenizer.json
    out/meta.json
    out/train/shard-00000.arrow, shard-00001.arrow, ...
    out/val/shard-00000.arrow, ...

Each shard is an uncompressed Arrow IPC file with one record batch and one column
`tokens` (uint16, or uint32 when the vocabulary has more than 65536 entries), so the
loader memory-maps it and views it as numpy without a copy.

Split: every document's token stream is cut at int(n * (1 - val_fraction)); the head goes
to train and the tail to val. For a single file this is exactly nanoGPT's split (first 90%
train, last 10% val); for a directory, val is the concatenation of each document's tail
(so every document is represented in val and no split depends on file sizes). With the
BPE tokenizer and more than one document, each document is followed by <|endoftext|>.

A directory corpus is read recursively (hidden entries skipped) in sorted path order; text
files are those with a text suffix (TEXT_SUFFIXES) or no suffix. With more than one file
(or use_ray=True) files are scanned and tokenized in parallel with Ray Data; a local Ray is
started only if none is running, and shut down afterwards only if we started it. On a
multi-node cluster the corpus path must be readable from every node.

Atomic: everything is written into a temp dir beside `out`, which is renamed into place at
the end; on failure the temp dir is removed and an existing `out` is left untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from raygpt.errors import UserError
from raygpt.data.tokenizer import (
    MIN_BPE_VOCAB,
    TOKENIZER_FILE,
    Tokenizer,
    split_at_pretoken_boundaries,
    tokenizer_from_json,
    train_bpe_tokenizer,
    train_char_tokenizer,
)

META_FILE = "meta.json"
SPLITS = ("train", "val")
BUNDLED_NAME = "tinyshakespeare"
BUNDLED_LABEL = f"bundled:{BUNDLED_NAME}"
FORMAT_VERSION = 1
# Each split needs at least one (input, target) pair.
MIN_SPLIT_TOKENS = 2
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".csv", ".tsv",
    ".json", ".jsonl", ".ndjson", ".xml", ".html", ".htm", ".srt", ".vtt", ".log",
    ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
    ".rb", ".sh", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg",
})

# Test hook: called with the path of every shard right after it is written.
_after_shard: Callable[[Path], None] | None = None

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- corpus


def bundled_corpus_path() -> Path:
    return Path(str(resources.files("raygpt") / "assets" / "tinyshakespeare.txt"))


def _resolve_corpus(corpus: str | os.PathLike | None) -> tuple[list[Path], str, bool]:
    """-> (files in order, label for meta/errors, is_directory)."""
    if corpus is None:
        return [bundled_corpus_path()], BUNDLED_LABEL, False
    p = Path(corpus).expanduser()
    if not p.exists():
        raise UserError(f"corpus {p} does not exist")
    if p.is_file():
        return [p], str(p), False
    if not p.is_dir():
        raise UserError(f"corpus {p} is neither a file nor a directory")
    files = []
    for root, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            f = Path(root) / n
            if n.startswith(".") or not f.is_file():
                continue
            if f.suffix.lower() in TEXT_SUFFIXES or not f.suffix:
                files.append(f)
    if not files:
        raise UserError(f"corpus directory {p} has no text files "
                        f"(*.txt, *.md, ... or files without a suffix)")
    return files, str(p), True


def _decode(path: Path, data: bytes) -> tuple[str | None, str | None]:
    """-> (text, error)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"corpus file {path} is not UTF-8: invalid byte 0x{data[e.start]:02x} "
                      f"at byte offset {e.start}")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, None


def _read_text(path: Path) -> str:
    text, err = _decode(path, Path(path).read_bytes())
    if err:
        raise UserError(err)
    return text


def _scan_file(path: Path, want_chars: bool) -> dict:
    data = Path(path).read_bytes()
    text, err = _decode(path, data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "nbytes": len(data),
        "nchars": len(text) if text is not None else 0,
        "chars": "".join(sorted(set(text))) if (want_chars and text) else "",
        "error": err or "",
    }


def _corpus_stat(files: list[Path], label: str) -> str:
    """Cheap fingerprint (relative names, sizes, mtimes) to notice a changed corpus."""
    h = hashlib.sha256()
    base = Path(label) if not label.startswith("bundled:") else None
    for f in files:
        st = f.stat()
        rel = f.relative_to(base).as_posix() if base is not None and base.is_dir() else f.name
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- shards


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    import pyarrow as pa

    batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    if _after_shard is not None:
        _after_shard(path)


class _ShardWriter:
    """Streams token arrays into fixed-size shards (the last one holds the rest)."""

    def __init__(self, directory: Path, dtype: str, shard_tokens: int):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_shards = 0

    def add(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            return
        self.buf.append(np.asarray(tokens, dtype=self.dtype))
        self.buffered += len(tokens)
        self.num_tokens += len(tokens)
        if self.buffered >= self.shard_tokens:
            data = np.concatenate(self.buf)
            n_full = len(data) // self.shard_tokens
            for i in range(n_full):
                self._flush(data[i * self.shard_tokens:(i + 1) * self.shard_tokens])
            rest = data[n_full * self.shard_tokens:]
            self.buf, self.buffered = ([rest] if len(rest) else []), len(rest)

    def _flush(self, data: np.ndarray) -> None:
        _write_shard(self.dir / f"shard-{self.num_shards:05d}.arrow", data)
        self.num_shards += 1

    def close(self) -> None:
        if self.buffered:
            self._flush(np.concatenate(self.buf))
        self.buf, self.buffered = [], 0


# ----------------------------------------------------------------------------- Ray Data


def _scan_batch(batch, want_chars: bool):
    import pyarrow as pa

    rows = [_scan_file(Path(p), want_chars) for p in batch.column("path").to_pylist()]
    return pa.table({
        "idx": batch.column("idx"),
        **{k: pa.array([r[k] for r in rows]) for k in ("sha256", "nbytes", "nchars", "chars", "error")},
    })


_TOK_CACHE: dict[str, Tokenizer] = {}


def _encode_batch(batch, tok_json: str, dtype: str):
    import pyarrow as pa

    key = hashlib.sha256(tok_json.encode()).hexdigest()
    tok = _TOK_CACHE.get(key)
    if tok is None:
        tok = _TOK_CACHE[key] = tokenizer_from_json(tok_json)
    out = []
    for p in batch.column("path").to_pylist():
        out.append(tok.encode_np(_read_text(Path(p))).astype(dtype).tobytes())
    return pa.table({"idx": batch.column("idx"), "tokens": pa.array(out, type=pa.large_binary())})


@contextmanager
def _ray_data():
    """A running Ray (started here only if needed) and an ordered, quiet Ray Data context."""
    import ray
    from ray.data import DataContext

    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
        started = True
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    data_logger = logging.getLogger("ray.data")  # we print our own progress lines
    saved_level = data_logger.level
    data_logger.setLevel(max(logging.ERROR, saved_level))
    try:
        yield ray
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        data_logger.setLevel(saved_level)
        if started:
            ray.shutdown()


def _dataset(ray, files: list[Path]):
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    blocks = max(1, min(len(files), 4 * cpus, 1000))
    return ray.data.from_items([{"idx": i, "path": str(f)} for i, f in enumerate(files)],
                               override_num_blocks=blocks)


def _scan_all(files: list[Path], want_chars: bool, ray, log: Log) -> list[dict]:
    if ray is None:
        out = []
        for i, f in enumerate(files):
            out.append(_scan_file(f, want_chars))
            if out[-1]["error"]:
                break  # the first bad file is reported; no need to read the rest
        return out
    ds = _dataset(ray, files).map_batches(
        _scan_batch, fn_kwargs={"want_chars": want_chars}, batch_format="pyarrow", batch_size=None)
    rows = sorted(ds.take_all(), key=lambda r: r["idx"])
    log(f"scanned {len(rows)} files with Ray Data")
    return rows


def _encode_all(files: list[Path], tok: Tokenizer, dtype: str, ray, log: Log
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (file index, token ids) in file order."""
    if ray is None:
        for i, f in enumerate(files):
            yield i, tok.encode_np(_read_text(f)).astype(dtype)
        return
    tok_json = json.dumps(tok.to_dict()) if tok.kind == "char" else tok.to_str()
    ds = _dataset(ray, files).map_batches(
        _encode_batch, fn_kwargs={"tok_json": tok_json, "dtype": dtype},
        batch_format="pyarrow", batch_size=None)
    expected = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for idx, data in zip(batch.column("idx").to_pylist(), batch.column("tokens").to_pylist()):
            if idx != expected:  # preserve_order guarantees this; never write out of order
                raise RuntimeError(f"Ray Data returned file {idx} when {expected} was expected")
            expected += 1
            yield idx, np.frombuffer(data, dtype=dtype)


# ----------------------------------------------------------------------------- prepare


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


def prepare_corpus(
    corpus: str | os.PathLike | None,
    out: str | os.PathLike,
    tokenizer: str = "char",
    vocab_size: int = 2048,
    val_fraction: float = 0.1,
    shard_tokens: int = 50_000_000,
    use_ray: bool | None = None,
    *,
    overwrite: bool = True,
    log: Log | None = None,
) -> dict:
    """Tokenize `corpus` (None = bundled tinyshakespeare; a file; or a directory of text
    files) into `out` and return its meta dict. `vocab_size` applies to BPE only.
    use_ray None = Ray Data when the corpus has more than one file. overwrite=False keeps an
    `out` that already exists (e.g. another process prepared it meanwhile) and returns its meta.
    `log` receives progress lines."""
    t0 = time.time()
    log = log or (lambda _msg: None)
    if tokenizer not in ("char", "bpe"):
        raise UserError(f"unknown tokenizer {tokenizer!r}: use 'char' or 'bpe'")
    if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"vocab_size={vocab_size} is too small for the BPE tokenizer "
                        f"(at least {MIN_BPE_VOCAB}: 256 bytes + <|endoftext|>)")
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be at least 1")
    out = Path(out).expanduser().absolute()
    files, label, is_dir = _resolve_corpus(corpus)
    _check_out(out)
    if use_ray is None:
        use_ray = len(files) > 1

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if use_ray:
            with _ray_data() as ray:
                meta = _build(files, label, is_dir, tmp, tokenizer, vocab_size, val_fraction,
                              shard_tokens, ray, log)
        else:
            meta = _build(files, label, is_dir, tmp, tokenizer, vocab_size, val_fraction,
                          shard_tokens, None, log)
        if not _install(tmp, out, overwrite):
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"{out} was prepared meanwhile by someone else: keeping it")
            return read_meta(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.time() - t0:.1f}s")
    return meta


def _build(files, label, is_dir, tmp: Path, kind, vocab_size, val_fraction, shard_tokens,
           ray, log: Log) -> dict:
    t0 = time.time()
    log(f"reading {len(files)} file{'s' * (len(files) != 1)} from {label}"
        + (" with Ray Data" if ray is not None else ""))
    scans = _scan_all(files, kind == "char", ray, log)
    for f, s in zip(files, scans):
        if s["error"]:
            raise UserError(s["error"])
    docs = [f for f, s in zip(files, scans) if s["nchars"] > 0]
    if not docs:
        if is_dir:
            raise UserError(f"corpus directory {label} has no text: all its "
                            f"{len(files)} text files are empty")
        raise UserError(f"corpus file {files[0] if label == BUNDLED_LABEL else label} is empty")
    total_bytes = sum(s["nbytes"] for s in scans)
    if is_dir:
        base = Path(label)
        lines = "".join(f"{s['sha256']}  {f.relative_to(base).as_posix()}\n"
                        for f, s in zip(files, scans))
        corpus_sha = hashlib.sha256(lines.encode()).hexdigest()
    else:
        corpus_sha = scans[0]["sha256"]

    if kind == "char":
        tok = train_char_tokenizer("".join(sorted(set("".join(s["chars"] for s in scans)))))
    else:
        log(f"training byte-level BPE (vocab {vocab_size}) on {total_bytes / 1e6:.1f} MB")

        def texts():
            for f in docs:
                yield from split_at_pretoken_boundaries(_read_text(f), 1 << 20)

        tok = train_bpe_tokenizer(texts(), vocab_size)
    log(f"{kind} tokenizer: vocab {tok.vocab_size} ({time.time() - t0:.1f}s)")
    tok.save(tmp / TOKENIZER_FILE)

    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: _ShardWriter(tmp / s, dtype, shard_tokens) for s in SPLITS}
    eos = np.asarray([tok.eos_id], dtype=dtype) if (tok.eos_id is not None and len(docs) > 1) else None
    last_log = time.time()
    for n_done, (_idx, ids) in enumerate(_encode_all(docs, tok, dtype, ray, log), 1):
        if eos is not None:
            ids = np.concatenate([ids, eos])
        cut = int(len(ids) * (1.0 - val_fraction))
        writers["train"].add(ids[:cut])
        writers["val"].add(ids[cut:])
        if time.time() - last_log > 5 or n_done == len(docs):
            last_log = time.time()
            log(f"tokenized {n_done}/{len(docs)} files: "
                f"{writers['train'].num_tokens + writers['val'].num_tokens:,} tokens")
    for w in writers.values():
        w.close()
    n_train, n_val = writers["train"].num_tokens, writers["val"].num_tokens
    if n_train < MIN_SPLIT_TOKENS or n_val < MIN_SPLIT_TOKENS:
        raise UserError(
            f"corpus {label} is too small for val_fraction={val_fraction}: train gets {n_train} "
            f"and val {n_val} tokens, each split needs at least {MIN_SPLIT_TOKENS}")

    meta = build_meta(tok, n_train, n_val, {s: writers[s].num_shards for s in SPLITS}, dtype,
                      shard_tokens, val_fraction, label, files, total_bytes, corpus_sha)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def build_meta(tok, n_train: int, n_val: int, num_shards: dict, dtype: str, shard_tokens: int,
               val_fraction: float, label: str, files: list, total_bytes: int, corpus_sha: str,
               **extra) -> dict:
    """meta.json of a prepared dataset (also written by `raygpt data` for a new corpus)."""
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
        "split": "per document: first (1 - val_fraction) of its tokens -> train, rest -> val",
        "corpus": label,
        "corpus_files": len(files),
        "corpus_bytes": total_bytes,
        "corpus_sha256": corpus_sha,
        "corpus_stat": _corpus_stat(files, label),
        **extra,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a prepared data directory (`path` = the directory or the file)."""
    p = Path(path).expanduser()
    f = p / META_FILE if p.is_dir() or not p.suffix else p
    if not f.is_file():
        raise UserError(f"{p} has no {META_FILE}: run `raygpt prepare --out {p}`")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise UserError(f"{f} is not a raygpt meta.json (no vocab_size)")
    return meta


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    return Path(os.environ.get("RAYGPT_CACHE_DIR") or "~/.cache/raygpt").expanduser()


def _cache_key(data_cfg) -> str:
    if data_cfg.corpus is None:
        name = BUNDLED_NAME
    else:
        p = Path(data_cfg.corpus).expanduser().absolute()
        name = f"{p.stem or 'corpus'}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    key = f"{name}-{data_cfg.tokenizer}"
    if data_cfg.tokenizer == "bpe":
        key += f"-{data_cfg.bpe_vocab_size}"
    if data_cfg.val_fraction != 0.1:
        key += f"-val{data_cfg.val_fraction:g}"
    return key


def ensure_data(data_cfg, log: Log | None = None) -> Path:
    """The prepared data directory for a DataConfig.

    data.path set: it must hold meta.json (its tokenizer wins over data.tokenizer).
    data.path None: the bundled corpus (or data.corpus) is prepared once into
    `$RAYGPT_CACHE_DIR` (default ~/.cache/raygpt) /data/<corpus>-<tokenizer>[-<vocab>]
    and reused; it is prepared again when the corpus files changed (size or mtime).
    Safe when several processes do it at once: each writes its own temp dir, the first
    rename wins and the others keep its result."""
    if data_cfg.path:
        p = Path(data_cfg.path).expanduser()
        if not (p / META_FILE).is_file():
            raise UserError(f"data.path '{data_cfg.path}' has no {META_FILE}: "
                            f"run `raygpt prepare --out {data_cfg.path}`")
        return p
    files, label, _ = _resolve_corpus(data_cfg.corpus)
    target = cache_dir() / "data" / _cache_key(data_cfg)
    overwrite = False
    if (target / META_FILE).is_file():
        try:
            meta = read_meta(target)
        except UserError:
            meta = {}
        if meta.get("corpus_stat") == _corpus_stat(files, label):
            return target
        overwrite = True  # corpus changed (or unreadable meta): prepare again
    prepare_corpus(data_cfg.corpus, target, tokenizer=data_cfg.tokenizer,
                   vocab_size=data_cfg.bpe_vocab_size, val_fraction=data_cfg.val_fraction,
                   overwrite=overwrite, log=log)
    return target
