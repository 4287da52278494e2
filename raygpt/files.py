"""Small file helpers every layer may use (the errors layer: no raygpt imports): an
atomic write (temp name beside the file, then rename) and the local-path-or-URI test."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


def is_uri(path: str | os.PathLike) -> bool:
    """A storage URI (s3://, gs://, file://, any scheme pyarrow.fs knows), not a local path."""
    return "://" in str(path)


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[Path], object]) -> Path:
    """Readers see the old file or the new one, never half of it: `data` (text, bytes, or
    a function that writes the file it is given) goes to a temp name beside `path` (same
    suffix: writers that pick a format by it), then is renamed over it. On an error (a
    full disk) no half-written temp file is left behind. -> path."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # read-only: it was never created
            pass
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))
