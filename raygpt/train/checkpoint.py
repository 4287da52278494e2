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
                    async_pg=None):
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
        return dcp.async_save(state, checkpoint_id=str(path), process_group=async_pg)
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
