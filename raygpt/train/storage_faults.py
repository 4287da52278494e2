"""Real storage faults for `raygpt chaos` and the tests: a directory made read-only for
every process on this machine, then writable again.

Read-only is a bind mount of the directory onto itself, remounted read-only: creating,
renaming, deleting or opening a file for writing there fails with EROFS, for root too
(chmod does not stop root). The kernel checks at open(), so a file some process held
open for writing before the fault (rank 0's metrics.jsonl) still takes writes; anything
opened afterwards (a checkpoint, summary.json, a worker's registration) is refused.
Needs root (mount)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from raygpt.errors import UserError


def check_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UserError(f"{what} needs root: it bind-mounts the run directory read-only (mount)")


def _mount(*args: str) -> str | None:
    """None, or mount's one-line complaint."""
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


class ReadOnly:
    """`apply()` makes `path` read-only; `undo()` (idempotent) makes it writable again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self.active = False

    def apply(self) -> None:
        check_root("a read-only storage fault")
        p = str(self.path)
        err = _mount("--bind", p, p)
        if err is None:
            self.active = True
            err = _mount("-o", "remount,bind,ro", p)
        if err is not None:
            self.undo()
            raise UserError(f"cannot make {p} read-only: {err}")

    def undo(self) -> None:
        if not self.active:
            return
        # A reader with a file open there makes umount busy: detach it lazily then
        # (new opens see the writable directory at once; the reader keeps its file).
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        self.active = False
