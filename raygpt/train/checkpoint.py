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

import json
import os
import shutil
from pathlib import Path

from raygpt.errors import UserError

STATE_FILE = "raygpt_state.json"


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
                    async_pg=None, async_stager=None, async_mode: str = "thread"):
    """Every rank calls this. With use_async, returns a Future (dcp.async_save: the state
    is staged to host memory now, written in the background); else None once written."""
    dcp = _dcp()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dicts(model, optimizer)
    if rank == 0:
        tmp = path / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(trainer_state, indent=1))
        os.replace(tmp, path / STATE_FILE)
        if tokenizer_path and Path(tokenizer_path).is_file():
            shutil.copyfile(tokenizer_path, path / "tokenizer.json")
    if use_async:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if async_mode == "process" else AsyncCheckpointerType.THREAD
        return dcp.async_save(state, checkpoint_id=str(path), process_group=async_pg,
                              async_stager=async_stager, async_checkpointer_type=kind)
    dcp.save(state, checkpoint_id=str(path))
    return None


def read_state(path: str | os.PathLike) -> dict:
    p = Path(path) / STATE_FILE
    if not p.is_file():
        raise CheckpointError(f"{str(path)!r} is not a raygpt checkpoint (no {STATE_FILE})")
    return json.loads(p.read_text())


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


def is_complete(path: str | os.PathLike) -> bool:
    """Every shard file that DCP's .metadata references exists and is long enough. A
    checkpoint some rank never finished (crash mid-save) fails this."""
    p = Path(path)
    if not (p / STATE_FILE).is_file() or not (p / ".metadata").is_file():
        return False
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(p)).read_metadata()
    except Exception:
        return False
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    for rel, size in need.items():
        f = p / rel
        if not f.is_file() or f.stat().st_size < size:
            return False
    return True


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in a local run directory, oldest first."""
    out = []
    for d in Path(run_dir).glob("checkpoint_*"):
        if d.is_dir() and is_complete(d):
            out.append((read_state(d)["step"], d))
    return [d for _, d in sorted(out)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in a local run directory (by step)."""
    best, best_step = None, -1
    for d in Path(run_dir).glob("checkpoint_*"):
        f = d / STATE_FILE
        if f.is_file() and is_complete(d):
            try:
                step = json.loads(f.read_text())["step"]
            except (ValueError, KeyError):
                continue
            if step > best_step:
                best, best_step = d, step
    return best


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, or a run dir (-> its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / STATE_FILE).is_file():
        if not is_complete(p):
            raise CheckpointError(f"checkpoint {str(p)!r} is incomplete (a save that did not finish)")
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
    torch.save({**state, "meta": json.dumps(meta)}, tmp)
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
        self.pending = None  # (future, path, step, metrics)
        self._stager = None
        if use_async:
            # Host buffers (pinned on GPU) allocated at the first save, reused by every
            # later one; the same code on CPU (forced async) and GPU.
            from raygpt.train.staging import PinnedStager

            self._stager = PinnedStager(pin=device is not None and device.type == "cuda",
                                        shared=self.async_mode == "process")

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.cfg.every and step % self.cfg.every == 0) or step == max_steps

    def _target(self, step: int) -> tuple[Path, str]:
        if self.root is not None:
            return self.root / f"checkpoint_{step:07d}", "in_place"
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-")), "upload"

    def save(self, step: int, parts, optimizers, trainer_state: dict, metrics: dict, rng_meta: dict,
             final: bool = False) -> float:
        """Every rank calls this. Returns the seconds training was blocked."""
        import time

        self.wait()
        path, mode = self._target(step)
        t0 = time.perf_counter()
        self.before_write(step)
        save_rng(path, self.rank, rng_meta)
        fut = save_checkpoint(path, parts, optimizers, trainer_state, self.rank, self.tokenizer_path,
                              use_async=self.use_async and not final, async_pg=self.cpu_group,
                              async_stager=self._stager, async_mode=self.async_mode)
        blocked = time.perf_counter() - t0
        metrics = dict(metrics, checkpoint_blocked_s=round(blocked, 4))
        self.on_event("checkpoint", step=step, blocked_s=round(blocked, 4), asynchronous=fut is not None)
        if fut is not None:
            self.pending = (fut, path, mode, step, metrics)
        else:
            self.report(path, step, metrics, mode)
        return blocked

    def local_done(self) -> bool:
        return self.pending is None or self.pending[0].done()

    def complete_pending(self) -> None:
        """All ranks call this at the same step once every rank's async write is done
        (or to wait for it): report the checkpoint."""
        if self.pending is None:
            return
        fut, path, mode, step, metrics = self.pending
        self.pending = None
        fut.result()
        self.on_event("checkpoint_reported", step=step)
        self.report(path, step, metrics, mode)

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
                local = latest_checkpoint(self.root)
                if local is not None and read_state(local)["step"] > best_step:
                    best = str(local)
            choice = [best]
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def prune_unfinished(self, restored_step: int) -> None:
        """Rank 0 removes the incomplete checkpoint dirs newer than the one resumed from
        (saves a crash cut short; this run writes those steps again). Retention of
        reported checkpoints is the runtime's (Ray's CheckpointConfig.num_to_keep)."""
        if self.rank != 0 or self.root is None:
            return
        for d in self.root.glob("checkpoint_*"):
            if d.is_dir() and not is_complete(d):
                try:
                    step = int(d.name.split("_")[-1])
                except ValueError:
                    continue
                if step > restored_step:
                    shutil.rmtree(d, ignore_errors=True)
