"""What an exported model directory holds, by name, and how it is written: shared by
raygpt's own format (raygpt.model.io) and the Hugging Face one (raygpt.model.hf)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from raygpt.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


class ModelDirError(UserError, ValueError):
    """A model directory that is missing, incomplete or inconsistent."""


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temp dir beside `out`; on success it replaces `out` whole, on an error it
    is removed: a reader never sees a half-written model directory."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
