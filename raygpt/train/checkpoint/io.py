"""Checkpoint I/O: every rank's DCP save and load of {"model", "optim"}, rank 0's trainer
state file (raygpt_state.json) beside the shards, and what a failed save was."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

from raygpt.errors import UserError, describe_os_error, one_line
from raygpt.train.checkpoint.rng import save_rng

STATE_FILE = "raygpt_state.json"


class CheckpointError(UserError, ValueError):
    pass


def _pairs(model, optimizer):
    """(module, optimizer) pairs: one for a plain/wrapped model, one per pipeline stage."""
    if isinstance(model, (list, tuple)):
        return list(zip(model, optimizer))
    return [(model, optimizer)]


def _opts():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Flattened optimizer state: keys per parameter FQN (incl. param-group settings), so
    # stages that hold different parameters never collide and any plan can load them.
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _parts(model, optimizer) -> list[tuple]:
    """(module, optimizer, model state dict, optimizer state dict) for each pair."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return [(m, o, *get_state_dict(m, o, options=_opts())) for m, o in _pairs(model, optimizer)]


def _merged(parts: list[tuple]) -> dict:
    return {"model": {k: v for _, _, msd, _ in parts for k, v in msd.items()},
            "optim": {k: v for _, _, _, osd in parts for k, v in osd.items()}}


def state_dicts(model, optimizer) -> dict:
    """{"model": ..., "optim": ...} of every (stage's) module and optimizer, merged."""
    return _merged(_parts(model, optimizer))


def save_checkpoint(path: str | os.PathLike, model, optimizer, trainer_state: dict, rank: int,
                    tokenizer_path: str | os.PathLike | None = None, use_async: bool = False,
                    async_pg=None, async_stager=None, async_mode: str = "thread", rng_meta: dict | None = None):
    """Every rank calls this. With use_async, returns a Future (dcp.async_save: the state
    is staged to host memory now, written in the background); else None once written.
    rng_meta: also write this rank's RNG state (save_rng).

    A write that fails on one rank only (rank 0's trainer state, a rank's RNG file) must
    fail the save on every rank, and before DCP's collectives a raise would leave the
    other ranks blocked in them. So the failing rank still enters DCP, with a planner that
    raises that error in DCP's local planning step: DCP's own gather of the per-rank plans
    then raises it (a CheckpointException naming the rank) on every rank, or in every
    rank's future. No rank waits on another that left, and no extra collective is run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    path = Path(path)
    state = state_dicts(model, optimizer)
    error = _write_rank_files(path, rank, trainer_state, tokenizer_path, rng_meta)
    planner = _RaiseInPlanning(error) if error is not None else None
    # An explicit writer: DCP's own pick from a str checkpoint_id probes the path's parents
    # for write access before any collective, and can raise (on that rank only) when the
    # storage is read-only (torch 2.13 _storage_utils._storage_setup).
    writer = FileSystemWriter(path)
    if use_async:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if async_mode == "process" else AsyncCheckpointerType.THREAD
        return dcp.async_save(state, storage_writer=writer, planner=planner, process_group=async_pg,
                              async_stager=async_stager, async_checkpointer_type=kind)
    with _quiet_no_dist():
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=_one_rank())
    return None


def _one_rank() -> bool:
    """No peers: DCP then skips its collectives. Run over gloo with a large payload (the
    optimizer's hundreds of param-group entries), they left every later CPU step ~1.45x
    slower (shakespeare-char-cpu: 32 -> 48 ms, 2.0 -> 1.4 cores busy; not with no_dist).
    The OpenMP worker then sleeps between regions (OMP_WAIT_POLICY=ACTIVE eases it): most
    likely libgomp's throttled spin-waits, once gloo's own threads have run a parallel op."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns at every no_dist call that it assumes a single process: we asked for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_rank_files(path: Path, rank: int, trainer_state: dict, tokenizer_path, rng_meta) -> Exception | None:
    """This rank's files beside the DCP shards. -> the error instead of raising it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if rng_meta is not None:
            save_rng(path, rank, rng_meta)
        if rank == 0:
            tmp = path / f".{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(trainer_state, indent=1))
            os.replace(tmp, path / STATE_FILE)
            if tokenizer_path and Path(tokenizer_path).is_file():
                shutil.copyfile(tokenizer_path, path / "tokenizer.json")
    except Exception as e:  # a bug too: raised on every rank by DCP, like a storage error
        return e
    return None


class _RaiseInPlanning:
    """A DCP SavePlanner for a rank whose own files failed: raises that error in the local
    planning step (DCP calls set_up_planner first there). Plain and picklable: async
    saves in a checkpoint process get it pickled."""

    def __init__(self, error: Exception):
        self.error = error

    def set_up_planner(self, state_dict=None, storage_meta=None, is_coordinator: bool = False) -> None:
        raise self.error

    def create_local_plan(self):
        raise self.error


def storage_error(exc: BaseException) -> str | None:
    """One line describing a failed save when every cause is an OSError (read-only or full
    storage, I/O error), also inside DCP's CheckpointException (per-rank failures) or
    raised `from` one; None for anything else (a bug: raise it)."""
    found = _os_errors(exc, None)
    if not found:
        return None
    rank, e = found[0]
    where = f"rank {rank}: " if rank is not None else ""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{where}{describe_os_error(e)}{more}"


def _os_errors(exc: BaseException, rank: int | None) -> list[tuple[int | None, OSError]] | None:
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(exc, OSError):
        return [(rank, exc)]
    if isinstance(exc, CheckpointException) and exc.failures:
        out: list = []
        for r, (inner, _trace) in sorted(exc.failures.items()):
            got = _os_errors(inner, r)
            if got is None:
                return None
            out += got
        return out
    if exc.__cause__ is not None:
        return _os_errors(exc.__cause__, rank)
    return None


def read_state(path: str | os.PathLike) -> dict:
    """The trainer state of the checkpoint at `path` (CheckpointError, one line, if none)."""
    p = Path(path) / STATE_FILE
    try:
        return parse_state(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not a raygpt checkpoint (no {STATE_FILE})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {str(p)!r}: {describe_os_error(e)}") from e
    except ValueError as e:
        raise CheckpointError(f"{str(p)!r} does not parse: {one_line(e)}") from None


def parse_state(text: str) -> dict:
    """The trainer state in a raygpt_state.json's text (ValueError when it is not one)."""
    state = json.loads(text)  # JSONDecodeError is a ValueError
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


def check_compatible(saved_model_cfg: dict, model_cfg: dict, where: str) -> None:
    """Refuse a checkpoint of another model shape with a message naming the fields."""
    keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
    diff = [f"model.{k}: checkpoint {saved_model_cfg.get(k)!r} vs config {model_cfg.get(k)!r}"
            for k in keys if saved_model_cfg.get(k) != model_cfg.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {where} has a different model shape ({'; '.join(diff)})")


def load_checkpoint(path: str | os.PathLike, model, optimizer) -> dict:
    """Every rank calls this; loads into the current (possibly different) plan. -> the
    trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    parts = _parts(model, optimizer)
    state = _merged(parts)  # DCP loads into it (non-tensor values replaced): read back from it
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=str(path), no_dist=_one_rank())
    for m, o, msd, osd in parts:
        set_state_dict(m, o, model_state_dict={k: state["model"][k] for k in msd},
                       optim_state_dict={k: state["optim"][k] for k in osd}, options=_opts())
    return read_state(path)
