"""Which checkpoints a run directory holds: each one's status (complete, incomplete,
unreadable), the complete ones by step, the latest, and a path -> one checkpoint."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from raygpt.errors import describe_os_error, one_line
from raygpt.train.checkpoint.io import STATE_FILE, CheckpointError, parse_state

logger = logging.getLogger(__name__)

COMPLETE, INCOMPLETE, UNREADABLE = "complete", "incomplete", "unreadable"


def checkpoint_status(path: str | os.PathLike) -> str:
    """What a checkpoint directory is, one of:
    "complete": every shard file that DCP's .metadata references exists and is long enough;
    "incomplete", provably: a file is missing (raygpt_state.json, .metadata, a shard) or a
    shard is too short: a save some rank never finished (crash mid-save);
    "unreadable": something is there but could not be read (an OSError other than a
    missing file, a .metadata or state file that does not parse): maybe a storage hiccup,
    maybe a good checkpoint; never delete it, never resume from it."""
    return _inspect(Path(path))[0]


def is_complete(path: str | os.PathLike) -> bool:
    return checkpoint_status(path) == COMPLETE


def inspect_checkpoint(path: str | os.PathLike) -> tuple[str, int | None, str]:
    """(checkpoint_status, its step when the state file reads, why it is not complete)."""
    status, state, why = _inspect(Path(path))
    return status, (state or {}).get("step"), why


def _inspect(p: Path) -> tuple[str, dict | None, str]:
    """(status, the trainer state when it reads, why it is not complete)."""
    try:
        state = parse_state((p / STATE_FILE).read_text())
    except FileNotFoundError:
        return INCOMPLETE, None, f"no {STATE_FILE}"
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError too
        return UNREADABLE, None, f"{STATE_FILE}: {one_line(e)}"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(p)).read_metadata()
    except FileNotFoundError:
        return INCOMPLETE, state, "no .metadata"
    except Exception as e:  # another OSError, or a .metadata that does not unpickle
        return UNREADABLE, state, f".metadata: {one_line(e)}"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    status, why = _shards_status(p, need)
    return status, state, why


def _shards_status(p: Path, need: dict[str, int]) -> tuple[str, str]:
    """(status, why) of the shard files `need` names (relative path -> bytes they must hold)."""
    for rel, size in need.items():
        try:
            st = (p / rel).stat()
        except FileNotFoundError:
            return INCOMPLETE, f"no {rel}"
        except OSError as e:
            return UNREADABLE, f"{rel}: {describe_os_error(e)}"
        if not stat.S_ISREG(st.st_mode):
            return UNREADABLE, f"{rel} is not a regular file"
        if st.st_size < size:
            return INCOMPLETE, f"{rel} has {st.st_size} of {size} bytes"
    return COMPLETE, ""


def checkpoint_dirs(run_dir: str | os.PathLike):
    """(step from the name, dir) of the checkpoint_* dirs; a dir whose type cannot be read
    is included (its inspection says so)."""
    for d in Path(run_dir).glob("checkpoint_*"):
        try:
            step = int(d.name.split("_")[-1])
        except ValueError:
            continue
        try:
            if not d.is_dir():
                continue
        except OSError:
            pass
        yield step, d


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints in a local run directory, by the step each
    one holds: one scan. Unreadable ones are skipped with a warning: one that cannot be
    read now is not resumed from, so the newest readable complete one is the latest."""
    out = []
    for _, d in checkpoint_dirs(run_dir):
        status, state, why = _inspect(d)
        if status == COMPLETE:
            out.append((state["step"], d))
        elif status == UNREADABLE:
            logger.warning("checkpoint %s skipped: it cannot be read (%s)", d, why)
    return sorted(out)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in a local run directory, oldest first (complete_checkpoints)."""
    return [d for _, d in complete_checkpoints(run_dir)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete (and readable) checkpoint in a local run directory (by step)."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, or a run dir (-> its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if any(os.path.lexists(p / name) for name in (STATE_FILE, ".metadata")):
        status, _, why = _inspect(p)
        if status == INCOMPLETE:
            raise CheckpointError(f"checkpoint {str(p)!r} is incomplete (a save that did not finish: {why})")
        if status == UNREADABLE:
            raise CheckpointError(f"checkpoint {str(p)!r} cannot be read ({why})")
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{str(p)!r} holds no raygpt checkpoint (expected {STATE_FILE})")
    return latest
