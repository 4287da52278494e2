"""Corpus inputs: where the files are, how they are cut into segments, and their documents.

A corpus is a file, a directory (read recursively, hidden entries skipped), a glob, or a
storage URI (`s3://`, `gs://`, `file://`, any scheme pyarrow.fs knows) of those. Formats
by suffix (after an optional `.gz`):

    .jsonl .json .ndjson  one JSON object a line; the document is its `text_field`
    .parquet              the `text_field` column, one document a row
    anything else known   text: the whole file is one document (TEXT_SUFFIXES, or no suffix)

Files are planned into segments of about `segment_bytes` so that one big file is read
and encoded in parallel: text files are cut after a newline followed by a printable ASCII
character (the GPT-2 pre-tokenizer always breaks there, so the pieces encode exactly as
the whole), jsonl files after a newline (a document boundary), parquet files between row
groups. A `.gz` file is one segment, decompressed as a stream.

Every reader error is a `BadInput` naming the file (and the line, for jsonl).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from raygpt.errors import UserError
from raygpt.files import is_uri

TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".csv", ".tsv",
    ".xml", ".html", ".htm", ".srt", ".vtt", ".log",
    ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs",
    ".rb", ".sh", ".sql", ".yaml", ".yml", ".toml", ".ini", ".cfg",
})
JSONL_SUFFIXES = frozenset({".jsonl", ".json", ".ndjson"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
SEGMENT_BYTES = 32 << 20
_GLOB = re.compile(r"[*?\[]")
# A cut point for text: after "\n" when the next byte is printable, non-space ASCII.
_TEXT_CUT = re.compile(rb"\n(?=[!-~])")


class BadInput(UserError):
    """A corpus file that cannot be read as its format says (message names the file)."""

    def __init__(self, file: str, msg: str):
        super().__init__(msg)
        self.file = file


def filesystem(target: str):
    """(pyarrow FileSystem, path inside it) for a local path or a storage URI."""
    import pyarrow.fs as pafs

    if not is_uri(target):
        return pafs.LocalFileSystem(), str(Path(target).expanduser().absolute())
    try:
        return pafs.FileSystem.from_uri(target)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad URI
        raise UserError(f"storage URI {target} is unreachable: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def file_format(name: str) -> tuple[str | None, bool]:
    """(format 'txt'|'jsonl'|'parquet' or None when not a corpus file, gzipped)."""
    n = name.lower()
    gz = n.endswith(".gz")
    if gz:
        n = n[:-3]
    suffix = os.path.splitext(n)[1]
    if suffix in JSONL_SUFFIXES:
        return "jsonl", gz
    if suffix in PARQUET_SUFFIXES:
        return (None if gz else "parquet"), False
    if suffix in TEXT_SUFFIXES or not suffix:
        return "txt", gz
    return None, gz


@dataclass(frozen=True)
class Source:
    """One corpus file. `uri` reopens it anywhere (a local path or a storage URI)."""
    uri: str
    rel: str
    fmt: str
    gz: bool
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Corpus:
    label: str
    files: list
    is_dir: bool

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _uri_for(base_uri: str, fs_path: str, local: bool) -> str:
    """The URI of one listed file, keeping what the corpus URI carried besides its path:
    credentials (s3://key:secret@bucket) and options (?endpoint_override=...&region=...),
    without which the file reopened on a worker resolved against the default endpoint
    (AWS) instead of the user's S3-compatible store."""
    if local:
        return fs_path
    from urllib.parse import urlsplit

    u = urlsplit(base_uri)
    if u.scheme == "file":
        return f"file://{fs_path}"
    if fs_path.startswith("/"):  # host-based filesystems (hdfs://host:port/path)
        head = u.netloc
    else:  # bucket-based (s3, gs): the path starts with the bucket; keep the credentials
        head = u.netloc.rsplit("@", 1)[0] + "@" if "@" in u.netloc else ""
    return f"{u.scheme}://{head}{fs_path}" + (f"?{u.query}" if u.query else "")


def resolve_corpus(corpus: str, label: str | None = None) -> Corpus:
    """Files of a corpus (a file, a directory, a glob or a URI) in sorted order."""
    import pyarrow.fs as pafs

    spec = str(corpus)
    local = not is_uri(spec)
    if local:
        spec = str(Path(spec).expanduser())
    pattern = None
    path_part = spec.split("://", 1)[-1].split("?", 1)[0] if not local else spec
    if _GLOB.search(path_part):
        if not local:
            raise UserError(f"corpus {corpus}: globs work for local paths; give a storage "
                            f"URI of a file or a directory")
        head = spec
        while _GLOB.search(head):
            head = head.rsplit("/", 1)[0] if "/" in head else "."
        pattern = spec
        fs, base = filesystem(head)
    else:
        fs, base = filesystem(spec)
    try:
        info = fs.get_file_info(base)
    except Exception as e:  # noqa: BLE001 - network errors, permissions, ...
        raise UserError(f"corpus {corpus} is unreachable: {_first_line(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"corpus {corpus} does not exist")
    if info.type == pafs.FileType.File and pattern is None:
        fmt, gz = file_format(info.base_name)
        return Corpus(label or str(corpus), [Source(_uri_for(spec, info.path, local), info.base_name,
                                                    fmt or "txt", gz, info.size, info.mtime_ns or 0)],
                      False)
    if info.type != pafs.FileType.Directory:
        raise UserError(f"corpus {corpus} is neither a file nor a directory")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"corpus {corpus} is unreachable: {_first_line(e)}") from None
    files = []
    prefix = base.rstrip("/") + "/"
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(prefix):] if fi.path.startswith(prefix) else fi.base_name
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if pattern is not None:
            full = _uri_for(spec, fi.path, local) if not local else fi.path
            want = pattern if not local else str(Path(pattern).absolute())
            if not fnmatch.fnmatchcase(full, want):
                continue
        fmt, gz = file_format(fi.base_name)
        if fmt is None:
            continue
        files.append(Source(_uri_for(spec, fi.path, local), rel, fmt, gz, fi.size, fi.mtime_ns or 0))
    files.sort(key=lambda s: s.rel)
    if not files:
        what = "glob" if pattern else "corpus directory"
        raise UserError(f"{what} {corpus} has no text files "
                        f"(*.txt, *.jsonl, *.parquet, *.gz of those, or files without a suffix)")
    return Corpus(label or str(corpus), files, pattern is None)


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Segment:
    """A part of one file: bytes [start, end) (text, jsonl) or row groups [start, end)
    (parquet); end -1 = to the end. `split` forces the split of its tokens ("train" or
    "val", for the per-document tail cut); None = a seeded choice per document.
    `eos`: the document ends in this segment (text files)."""
    file: int
    start: int
    end: int
    split: str | None
    eos: bool


def _find_cut(f, pos: int, fmt: str, limit: int) -> int | None:
    """First document boundary at or after `pos` (an absolute offset), or None."""
    window = 1 << 16
    off = pos
    while off < limit:
        f.seek(off)
        data = f.read(min(window, limit - off))
        if not data:
            return None
        if fmt == "jsonl":
            i = data.find(b"\n")
            if i >= 0:
                return off + i + 1
        else:
            m = _TEXT_CUT.search(data)
            if m is not None:
                return off + m.end()
        off += max(1, len(data) - 1)  # keep one byte: "\n" may end this window
        window = min(window * 4, 8 << 20)
    return None


def _byte_cuts(src: Source, start: int, end: int, segment_bytes: int) -> list[int]:
    """Boundaries inside [start, end) so that pieces are about segment_bytes each."""
    if end - start <= segment_bytes * 1.5:
        return []
    fs, path = filesystem(src.uri)
    cuts = []
    with fs.open_input_file(path) as f:
        pos = start + segment_bytes
        while end - pos > segment_bytes // 2:
            c = _find_cut(f, pos, src.fmt, end)
            if c is None or c >= end:
                break
            cuts.append(c)
            pos = c + segment_bytes
    return cuts


def _utf8_start(src: Source, pos: int) -> int:
    """`pos` moved forward to the start of a UTF-8 character."""
    fs, path = filesystem(src.uri)
    with fs.open_input_file(path) as f:
        f.seek(pos)
        data = f.read(4)
    for i, b in enumerate(data):
        if b & 0xC0 != 0x80:
            return pos + i
    return pos + len(data)


def parquet_meta(src: Source, text_field: str):
    import pyarrow.parquet as pq

    fs, path = filesystem(src.uri)
    try:
        with fs.open_input_file(path) as f:
            md = pq.ParquetFile(f).metadata
    except Exception as e:  # noqa: BLE001
        raise BadInput(src.uri, f"corpus file {src.uri} is not a readable parquet file: "
                                f"{_first_line(e)}") from None
    names = md.schema.names
    if text_field not in names:
        raise BadInput(src.uri, f"corpus file {src.uri} has no column '{text_field}' "
                                f"(columns: {', '.join(names)}; use --text-field)")
    return md


def plan_segments(corpus: Corpus, tail_split: bool, val_fraction: float, text_field: str,
                  segment_bytes: int = SEGMENT_BYTES, on_bad=None) -> list[Segment]:
    """Segments of every file. tail_split: each (text) document's first 1 - val_fraction
    of its bytes go to train and the rest to val; else splits are chosen per document.
    on_bad(BadInput) is called for a file found bad here (default: raise)."""
    segs: list[Segment] = []
    for i, src in enumerate(corpus.files):
        try:
            segs.extend(_file_segments(i, src, tail_split, val_fraction, text_field, segment_bytes))
        except BadInput as e:
            if on_bad is None:
                raise
            on_bad(e)
    return segs


def _file_segments(i, src: Source, tail_split, val_fraction, text_field, segment_bytes):
    if src.fmt == "parquet":
        md = parquet_meta(src, text_field)
        out, start, acc = [], 0, 0
        for g in range(md.num_row_groups):
            acc += md.row_group(g).total_byte_size
            if acc >= segment_bytes:
                out.append(Segment(i, start, g + 1, None, False))
                start, acc = g + 1, 0
        if start < md.num_row_groups:
            out.append(Segment(i, start, md.num_row_groups, None, False))
        return out
    if src.gz:
        # Not seekable: one segment; a tail cut happens inside the reader.
        return [Segment(i, 0, -1, "tail" if tail_split and src.fmt == "txt" else None, True)]
    if src.size == 0:
        return []
    if tail_split and src.fmt == "txt":
        cut = _utf8_start(src, int(src.size * (1.0 - val_fraction)))
        parts = []
        for split, a, b in (("train", 0, cut), ("val", cut, src.size)):
            if b <= a:
                continue
            bounds = [a, *_byte_cuts(src, a, b, segment_bytes), b]
            parts += [Segment(i, x, y, split, y == b) for x, y in zip(bounds, bounds[1:])]
        return parts
    bounds = [0, *_byte_cuts(src, 0, src.size, segment_bytes), src.size]
    return [Segment(i, x, y, None, y == src.size) for x, y in zip(bounds, bounds[1:])]


def group_segments(segs: list[Segment], corpus: Corpus, target_bytes: int) -> list[list[Segment]]:
    """Consecutive segments grouped into pieces of about target_bytes (one task each)."""
    pieces, cur, acc = [], [], 0
    for s in segs:
        src = corpus.files[s.file]
        n = (s.end - s.start) if (src.fmt != "parquet" and s.end >= 0) else src.size
        if cur and acc + n > target_bytes:
            pieces.append(cur)
            cur, acc = [], 0
        cur.append(s)
        acc += n
    if cur:
        pieces.append(cur)
    return pieces


def segments_to_json(segs: list[Segment]) -> str:
    return json.dumps([asdict(s) for s in segs])


def segments_from_json(s: str) -> list[Segment]:
    return [Segment(**d) for d in json.loads(s)]


# ----------------------------------------------------------------------------- reading


@dataclass
class Doc:
    """Text of (part of) one document. key: a stable id for the seeded val choice;
    end: the document ends with this text; split: forced split or None."""
    text: str
    key: int
    end: bool
    split: str | None


def _decode(src: Source, data: bytes, offset: int, line_base=None) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"at byte offset {offset + e.start}"
        if line_base is not None:
            line = line_base() + data.count(b"\n", 0, e.start) + 1
            where = f"(line {line}, byte offset {offset + e.start})"
        bad = data[e.start]
        raise BadInput(src.uri, f"corpus file {src.uri} is not UTF-8: invalid byte "
                                f"0x{bad:02x} {where}") from None
    return text


def _read_range(src: Source, start: int, end: int) -> bytes:
    fs, path = filesystem(src.uri)
    try:
        with fs.open_input_file(path) as f:
            f.seek(start)
            return f.read(end - start)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput(src.uri, f"corpus file {src.uri} is unreadable: {_first_line(e)}") from None


def _gz_chunks(src: Source, chunk: int) -> Iterator[bytes]:
    """Decompressed pieces of a .gz file, each ending at a line boundary (the last may not)."""
    fs, path = filesystem(src.uri)
    try:
        with fs.open_input_stream(path, compression="gzip") as f:
            rest = b""
            while True:
                data = f.read(chunk)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1 if src.fmt == "jsonl" else _last_text_cut(data)
                if cut <= 0:
                    rest = data
                    continue
                yield data[:cut]
                rest = data[cut:]
            if rest:
                yield rest
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt stream
        raise BadInput(src.uri, f"corpus file {src.uri} is not a readable gzip file: "
                                f"{_first_line(e)}") from None


def _last_text_cut(data: bytes) -> int:
    pos = len(data)
    while True:
        i = data.rfind(b"\n", 0, pos)
        if i < 0 or i + 1 >= len(data):
            if i < 0:
                return 0
            pos = i
            continue
        if 0x21 <= data[i + 1] <= 0x7E:
            return i + 1
        pos = i


def file_key(src: Source) -> int:
    import zlib

    return zlib.crc32(src.rel.encode()) & 0xFFFFFFFF


def read_segment(src: Source, seg: Segment, text_field: str, chunk_bytes: int = 4 << 20,
                 val_fraction: float = 0.1) -> Iterator[list[Doc]]:
    """Batches of documents (about chunk_bytes of text each) of one segment."""
    fkey = file_key(src) << 32
    if src.fmt == "parquet":
        yield from _read_parquet(src, seg, text_field, fkey, chunk_bytes)
        return
    if src.gz:
        if src.fmt == "txt" and seg.split == "tail":
            yield from _read_gz_text_tail(src, seg, fkey, chunk_bytes, val_fraction)
            return
        offset = 0
        lines_before = 0
        for data in _gz_chunks(src, chunk_bytes):
            if src.fmt == "jsonl":
                yield _jsonl_docs(src, data, offset, text_field, fkey, lambda n=lines_before: n)
                lines_before += data.count(b"\n")
            else:
                text = _decode(src, data, offset)
                if offset == 0 and text.startswith("\ufeff"):
                    text = text[1:]
                yield [Doc(text, fkey, False, None)]
            offset += len(data)
        if src.fmt == "txt":
            yield [Doc("", fkey, True, None)]  # the document ends here
        return
    start = seg.start
    while start < seg.end:
        end = min(seg.end, start + chunk_bytes)
        if end < seg.end:
            with_cut = _next_cut_in(src, start, end, seg.end)
            end = with_cut
        data = _read_range(src, start, end)
        if src.fmt == "jsonl":
            def lines_before(s=start):
                return _read_range(src, 0, s).count(b"\n") if s else 0
            yield _jsonl_docs(src, data, start, text_field, fkey, lines_before)
        else:
            text = _decode(src, data, start)
            if start == 0 and text.startswith("\ufeff"):
                text = text[1:]
            yield [Doc(text, fkey, end == seg.end and seg.eos, seg.split)]
        start = end


def _next_cut_in(src: Source, start: int, pos: int, end: int) -> int:
    fs, path = filesystem(src.uri)
    with fs.open_input_file(path) as f:
        c = _find_cut(f, pos, src.fmt, end)
    return end if c is None else c


def _jsonl_docs(src, data: bytes, offset: int, text_field: str, fkey: int, lines_before) -> list[Doc]:
    text = _decode(src, data, offset, lines_before)
    docs = []
    pos = 0
    base = None
    for n, line in enumerate(text.split("\n")):
        s = line.strip()
        if s:
            try:
                obj = json.loads(s)
            except ValueError as e:
                base = lines_before() if base is None else base
                raise BadInput(src.uri, f"corpus file {src.uri} line {base + n + 1}: not JSON "
                                        f"({_first_line(e)})") from None
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                base = lines_before() if base is None else base
                what = ("no" if not isinstance(obj, dict) or text_field not in obj
                        else "a non-string")
                raise BadInput(src.uri, f"corpus file {src.uri} line {base + n + 1}: {what} "
                                        f"'{text_field}' field (use --text-field)")
            docs.append(Doc(value, fkey ^ (offset + pos), True, None))
        pos += len(line.encode("utf-8")) + 1 if not line.isascii() else len(line) + 1
    return docs


def _read_parquet(src, seg, text_field, fkey, chunk_bytes):
    import pyarrow.parquet as pq

    fs, path = filesystem(src.uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise BadInput(src.uri, f"corpus file {src.uri} has no column '{text_field}' "
                                        f"(use --text-field)")
            row = sum(pf.metadata.row_group(g).num_rows for g in range(seg.start))
            for batch in pf.iter_batches(batch_size=2048, row_groups=range(seg.start, seg.end),
                                         columns=[text_field]):
                col = batch.column(0)
                docs = []
                for j, v in enumerate(col.to_pylist()):
                    if isinstance(v, str) and v:
                        docs.append(Doc(v, fkey ^ (row + j), True, None))
                    elif v is not None and not isinstance(v, str):
                        raise BadInput(src.uri, f"corpus file {src.uri} row {row + j}: column "
                                                f"'{text_field}' is not text")
                row += len(col)
                yield docs
    except (BadInput, UserError):
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput(src.uri, f"corpus file {src.uri} is not a readable parquet file: "
                                f"{_first_line(e)}") from None


def _read_gz_text_tail(src, seg, fkey, chunk_bytes, val_fraction):
    """A gzipped text document with the tail cut: the decompressed size is known only at
    the end, so this one document is held in memory."""
    parts = list(_gz_chunks(src, chunk_bytes))
    data = b"".join(parts)
    text = _decode(src, data, 0)
    bom = text.startswith("\ufeff")
    if bom:
        text = text[1:]
    cut = int(len(data) * (1.0 - val_fraction))  # as for a plain file: bytes, BOM included
    while cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut += 1
    ncut = max(0, len(data[:cut].decode("utf-8")) - bom)
    yield [Doc(text[:ncut], fkey, True, "train")]
    yield [Doc(text[ncut:], fkey, True, "val")]
