"""Where prepared data lives: the file names of a data directory, the node-local cache,
and a directory prepared on a storage URI made local (meta.json and tokenizer.json at
once; the loader fetches shards on demand). Shared by prepare and the loader."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from raygpt.errors import UserError
from raygpt.files import is_uri, write_atomic

META_FILE = "meta.json"
SOURCE_FILE = "source.json"  # in a cache dir: {"uri": ...} the shards come from


def cache_dir() -> Path:
    return Path(os.environ.get("RAYGPT_CACHE_DIR") or "~/.cache/raygpt").expanduser()


def local_data_dir(path) -> Path:
    """A local directory for prepared data at `path` (a local path or a storage URI).

    A URI: meta.json and tokenizer.json are copied into
    $RAYGPT_CACHE_DIR/remote/<uri hash>-<meta hash>/ (a new dir when the data was prepared
    again); shards follow on demand (TokenSplit). A local path must exist on this node."""
    from raygpt.data.sources import filesystem

    s = str(path)
    if not is_uri(s):
        p = Path(s).expanduser()
        if not (p / META_FILE).is_file():
            raise UserError(f"data directory {s} has no {META_FILE} on {socket.gethostname()}: "
                            f"run `raygpt prepare --out {s}`, or give a path every node can "
                            f"reach or a storage URI")
        return p
    fs, base = filesystem(s)
    base = base.rstrip("/")
    try:
        with fs.open_input_stream(f"{base}/{META_FILE}") as f:
            meta_bytes = f.read()
    except FileNotFoundError:
        raise UserError(f"{s} has no {META_FILE}: run `raygpt prepare --out {s}`") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{s} is unreachable: {str(e).splitlines()[0] if str(e) else e}") from None
    key = (hashlib.sha256(s.encode()).hexdigest()[:12] + "-"
           + hashlib.sha256(meta_bytes).hexdigest()[:12])
    d = cache_dir() / "remote" / key
    if (d / META_FILE).is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    _fetch(fs, f"{base}/tokenizer.json", d / "tokenizer.json")
    write_atomic(d / SOURCE_FILE, json.dumps({"uri": s}).encode())
    write_atomic(d / META_FILE, meta_bytes)  # last: the cache dir is complete
    return d


def _fetch(fs, src: str, dst: Path) -> None:
    """Copy one file from the filesystem into the cache (temp name, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)

    def copy(tmp: Path) -> None:
        with fs.open_input_stream(src) as f, open(tmp, "wb") as out:
            while True:
                chunk = f.read(8 << 20)
                if not chunk:
                    break
                out.write(chunk)

    write_atomic(dst, copy)
