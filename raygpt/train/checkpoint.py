"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint directory (Ray Train merges every rank's files into it):
  .metadata, __<rank>_0.distcp   DCP shards of {"model", "optim"} (FQN keys, no wrapper
                                 prefixes: get_state_dict strips DDP/AC/compile names)
  raygpt_state.json              step, world size, plan, config, RNG: written by rank 0
  tokenizer.json                 so a checkpoint exports without the data directory

Restore loads into whatever plan runs now: DCP reshards by global tensor coordinates.
Ray Train registers a checkpoint only after every rank reported it, so a save that
crashed half-way is never the "latest" one.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

from raygpt.errors import UserError

STATE_FILE = "raygpt_state.json"

logger = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    pass


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


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


def state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = {}, {}
    for m, o in _pairs(model, optimizer):
        msd, osd = get_state_dict(m, o, options=_opts())
        model_sd.update(msd)
        optim_sd.update(osd)
    return {"model": model_sd, "optim": optim_sd}


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
    from torch.distributed.checkpoint import FileSystemWriter

    dcp = _dcp()
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
    dcp.save(state, storage_writer=writer, planner=planner)
    return None


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


def describe_os_error(e: OSError) -> str:
    """'EROFS: Read-only file system: /path' (one line)."""
    name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
    msg = e.strerror or str(e)
    if e.filename:
        msg += f": {e.filename}"
    return " ".join(f"{name}: {msg}".split())


def read_state(path: str | os.PathLike) -> dict:
    p = Path(path) / STATE_FILE
    try:
        return _parse_state(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is not a raygpt checkpoint (no {STATE_FILE})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {str(p)!r}: {describe_os_error(e)}") from e
    except ValueError as e:
        raise CheckpointError(f"{str(p)!r} does not parse: {_one_line(e)}") from None


def _parse_state(text: str) -> dict:
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
    """Every rank calls this; loads into the current (possibly different) plan."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    dcp = _dcp()
    parts = []
    for m, o in _pairs(model, optimizer):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(m, o, options=_opts())
        parts.append((m, o, msd, osd))
    state = {"model": {k: v for _, _, msd, _ in parts for k, v in msd.items()},
             "optim": {k: v for _, _, _, osd in parts for k, v in osd.items()}}
    dcp.load(state, checkpoint_id=str(path))
    for m, o, msd, osd in parts:
        set_state_dict(m, o, model_state_dict={k: state["model"][k] for k in msd},
                       optim_state_dict={k: state["optim"][k] for k in osd}, options=_opts())
    return read_state(path)


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
        state = _parse_state((p / STATE_FILE).read_text())
    except FileNotFoundError:
        return INCOMPLETE, None, f"no {STATE_FILE}"
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError too
        return UNREADABLE, None, f"{STATE_FILE}: {_one_line(e)}"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        md = FileSystemReader(str(p)).read_metadata()
    except FileNotFoundError:
        return INCOMPLETE, state, "no .metadata"
    except Exception as e:  # another OSError, or a .metadata that does not unpickle
        return UNREADABLE, state, f".metadata: {_one_line(e)}"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, size in need.items():
        try:
            st = (p / rel).stat()
        except FileNotFoundError:
            return INCOMPLETE, state, f"no {rel}"
        except OSError as e:
            return UNREADABLE, state, f"{rel}: {describe_os_error(e)}"
        if not stat.S_ISREG(st.st_mode):
            return UNREADABLE, state, f"{rel} is not a regular file"
        if st.st_size < size:
            return INCOMPLETE, state, f"{rel} has {st.st_size} of {size} bytes"
    return COMPLETE, state, ""


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError):
        return describe_os_error(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _checkpoint_dirs(run_dir: Path):
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


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in a local run directory, oldest first (by the step each one
    holds). Unreadable ones are skipped with a warning: one that cannot be read now is
    not resumed from, so the newest readable complete one is the latest."""
    return [d for _, d in _complete_checkpoints(Path(run_dir))]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete (and readable) checkpoint in a local run directory (by step)."""
    found = _complete_checkpoints(Path(run_dir))
    return found[-1][1] if found else None


def _complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints, by step: one scan."""
    out = []
    for _, d in _checkpoint_dirs(run_dir):
        status, state, why = _inspect(d)
        if status == COMPLETE:
            out.append((state["step"], d))
        elif status == UNREADABLE:
            logger.warning("checkpoint %s skipped: it cannot be read (%s)", d, why)
    return sorted(out)


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


def download_checkpoint(uri: str) -> Path:
    """A checkpoint (or run dir: its newest checkpoint) at a pyarrow URI -> local temp dir."""
    import tempfile

    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)  # the query (endpoint, region) configures fs
    path = path.rstrip("/")
    info = fs.get_file_info(f"{path}/{STATE_FILE}")
    if info.type == pafs.FileType.NotFound:
        sel = pafs.FileSelector(path, allow_not_found=True)
        dirs = sorted(i.path for i in fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
        if not dirs:
            raise CheckpointError(f"{uri!r} holds no raygpt checkpoint")
        path = dirs[-1]  # checkpoint_<zero-padded step>: the newest sorts last
    local = Path(tempfile.mkdtemp(prefix="raygpt-export-"))
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """DCP checkpoint -> model.safetensors + config.json + tokenizer.json (one process,
    no process group: DCP assembles the full tensors from every rank's shard).
    `path` may be a local dir or a pyarrow URI (s3://...)."""
    if "://" in str(path) and not str(path).startswith("file://"):
        path = download_checkpoint(str(path))
    elif str(path).startswith("file://"):
        path = str(path)[len("file://"):]
    from raygpt.config import validate
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    ckpt = resolve_checkpoint(path)
    st = read_state(ckpt)
    cfg = validate(st["config"])
    gcfg = GPTConfig(**st["model"])
    model = GPT(gcfg)
    sd = {"model": model.state_dict()}
    try:
        _dcp().load(sd, checkpoint_id=str(ckpt))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {str(ckpt)!r}: {str(e).splitlines()[0]}") from None
    model.load_state_dict(sd["model"])
    tok = ckpt / "tokenizer.json"
    return save_model_dir(
        model, out, tok if tok.is_file() else None,
        extra={"step": st["step"], "val_loss": st.get("val_loss"), "source": str(ckpt),
               "raygpt_config": cfg.to_dict()},
    )


# ------------------------------------------------------------------ RNG state per rank

RNG_DIR = "rng"


def save_rng(path: str | os.PathLike, rank: int, meta: dict) -> None:
    """This rank's CPU (and CUDA) generator state: rng/rank<r>.pt (tensors only)."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    d = Path(path) / RNG_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rank}.tmp"
    with open(tmp, "wb") as f:  # a file object: torch.save(path) turns OSErrors into RuntimeErrors
        torch.save({**state, "meta": json.dumps(meta)}, f)
    os.replace(tmp, d / f"rank{rank}.pt")


def load_rng(path: str | os.PathLike, rank: int, meta: dict) -> bool:
    """Restore this rank's generators if the checkpoint was written by the same rank
    layout (meta: world size, plan); False (nothing changed) otherwise."""
    import torch

    f = Path(path) / RNG_DIR / f"rank{rank}.pt"
    if not f.is_file():
        return False
    state = torch.load(f, weights_only=True)
    if json.loads(state["meta"]) != meta:
        return False
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


# ------------------------------------------------------------------ CheckpointManager


class CheckpointManager:
    """When to save, where, the async save in flight, reporting, retention, and which
    checkpoint a (re)start resumes from. Ray-free: `report(path, step, metrics, mode)`
    is given by the runtime ("mode": "in_place" when `path` is already in the run's
    storage, "upload" when it is a temporary directory to copy there and delete).

    Saves go straight into <ckpt_root>/checkpoint_<step> when the run's storage is a
    local directory, so a finished async save is visible to the restore scan at once;
    every step the ranks agree (one tiny all-reduce on the CPU group) whether all their
    async writes are done, and report it then, not at the next save.
    """

    def __init__(self, ckpt_cfg, *, rank: int, world: int, ckpt_root: str | os.PathLike | None,
                 report, use_async: bool, cpu_group=None, device=None, tokenizer_path=None,
                 on_event=None, before_write=None):
        self.cfg = ckpt_cfg
        self.rank, self.world = rank, world
        self.root = Path(ckpt_root) if ckpt_root is not None else None
        self.report = report
        self.use_async = use_async
        self.async_mode = getattr(ckpt_cfg, "async_mode", "thread")
        self.cpu_group = cpu_group
        self.tokenizer_path = tokenizer_path
        self.on_event = on_event or (lambda name, **kw: None)
        self.before_write = before_write or (lambda step: None)
        self.pending = None  # (future, path, mode, step, metrics, created)
        self.requested = False  # checkpoint.every=auto: the ranks agreed to save at the next step
        self.failed_saves = 0  # consecutive saves the storage refused (0 after a success)
        self._stager = None
        if use_async:
            # Host buffers (pinned on GPU) allocated at the first save, reused by every
            # later one; the same code on CPU (forced async) and GPU.
            from raygpt.train.staging import PinnedStager

            self._stager = PinnedStager(pin=device is not None and device.type == "cuda",
                                        shared=self.async_mode == "process")

    def due(self, step: int, max_steps: int) -> bool:
        if self.cfg.every == "auto":
            return self.requested or step == max_steps
        return bool(self.cfg.every and step % self.cfg.every == 0) or step == max_steps

    def _target(self, step: int) -> tuple[Path, str]:
        if self.root is not None:
            return self.root / f"checkpoint_{step:07d}", "in_place"
        import tempfile

        try:
            return Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-")), "upload"
        except OSError:  # no raise before DCP's collectives: the save's own mkdir fails again
            return Path(tempfile.gettempdir()) / f"raygpt-ckpt-{step}-{os.getpid()}", "upload"

    def save(self, step: int, parts, optimizers, trainer_state: dict, metrics: dict, rng_meta: dict,
             final: bool = False) -> float:
        """Every rank calls this. Returns the seconds training was blocked. A save the
        storage refuses (read-only, full, an I/O error) fails on every rank alike (see
        save_checkpoint) and is dropped: an event, nothing reported; the next save retries."""
        import time

        self.wait()
        self.requested = False
        path, mode = self._target(step)
        created = mode == "upload" or not _exists(path)
        t0 = time.perf_counter()
        self.before_write(step)
        try:
            fut = save_checkpoint(path, parts, optimizers, trainer_state, self.rank, self.tokenizer_path,
                                  use_async=self.use_async and not final, async_pg=self.cpu_group,
                                  async_stager=self._stager, async_mode=self.async_mode, rng_meta=rng_meta)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._failed(e, step, path, created)
            return time.perf_counter() - t0
        blocked = time.perf_counter() - t0
        metrics = dict(metrics, checkpoint_blocked_s=round(blocked, 4))
        self.on_event("checkpoint", step=step, blocked_s=round(blocked, 4), asynchronous=fut is not None)
        if fut is not None:
            self.pending = (fut, path, mode, step, metrics, created)
        else:
            self._report(path, step, metrics, mode)
        return blocked

    def _report(self, path: Path, step: int, metrics: dict, mode: str) -> None:
        self.failed_saves = 0
        self.report(path, step, metrics, mode)

    def _failed(self, exc: BaseException, step: int, path: Path, created: bool) -> None:
        """A storage error: event, count, remove what this save created. Else raise."""
        error = storage_error(exc)
        if error is None:
            raise exc
        self.failed_saves += 1
        self.on_event("checkpoint_failed", step=step, error=error)
        logger.warning("checkpoint at step %d failed, training goes on: %s", step, error)
        if created:
            shutil.rmtree(path, ignore_errors=True)

    def local_done(self) -> bool:
        return self.pending is None or self.pending[0].done()

    def complete_pending(self) -> None:
        """All ranks call this at the same step once every rank's async write is done
        (or to wait for it): report the checkpoint (or drop it, on every rank alike: DCP
        raises a rank's storage error in every rank's future)."""
        if self.pending is None:
            return
        fut, path, mode, step, metrics, created = self.pending
        self.pending = None
        try:
            fut.result()
        except BaseException as e:
            self._failed(e, step, path, created)
            return
        self.on_event("checkpoint_reported", step=step)
        self._report(path, step, metrics, mode)

    def wait(self) -> None:
        self.complete_pending()

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---------------------------------------------------------------- restore choice
    def choose_restore(self, registered_step: int | None) -> str | None:
        """Rank 0's choice, the same on every rank: "registered" (the runtime's latest
        registered checkpoint, at `registered_step`; -1 when its step is unreadable), a
        newer complete checkpoint in the run's directory (its path: a save that finished
        but whose report never arrived), or None."""
        choice = [None]
        if self.rank == 0:
            best, best_step = None, -1
            if registered_step is not None:
                best, best_step = "registered", registered_step
            if self.root is not None and self.root.is_dir():
                local = _complete_checkpoints(self.root)
                if local and local[-1][0] > best_step:
                    best = str(local[-1][1])
            choice = [best]
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def prune_unfinished(self, restored_step: int) -> None:
        """Rank 0 removes the incomplete checkpoint dirs newer than the one resumed from
        (saves a crash cut short; this run writes those steps again). One that cannot be
        read is kept (a storage hiccup must not delete a good checkpoint): an event.
        Retention of reported checkpoints is the runtime's (Ray's CheckpointConfig.num_to_keep)."""
        if self.rank != 0 or self.root is None:
            return
        for step, d in sorted(_checkpoint_dirs(self.root)):
            if step <= restored_step:
                continue
            status, _, why = _inspect(d)
            if status == INCOMPLETE:
                shutil.rmtree(d, ignore_errors=True)
            elif status == UNREADABLE:
                logger.warning("checkpoint %s kept: it cannot be read (%s)", d, why)
                self.on_event("checkpoint_unreadable", step=step, error=why)


def _exists(path: Path) -> bool:
    """Whether `path` exists; True when that cannot be told (never remove it then)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True
