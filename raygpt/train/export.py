"""`raygpt export`, the one place a checkpoint becomes a model directory: a checkpoint
(local or at a URI) or a model directory -> a model directory in raygpt's format or as a
Hugging Face GPT-2 directory (--format hf)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raygpt.errors import UserError
from raygpt.files import is_uri
from raygpt.train.checkpoint.discovery import resolve_checkpoint
from raygpt.train.checkpoint.io import STATE_FILE, CheckpointError, read_state

FORMATS = ("raygpt", "hf")


def _is_model_dir(p: Path) -> bool:
    """config.json beside weights (a checkpoint holds DCP shards and raygpt_state.json)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (p / "config.json").is_file() and any((p / w).is_file() for w in weights)


def export_to(source: str | os.PathLike, out: str | os.PathLike, format: str = "raygpt") -> Path:
    """source: a checkpoint / run dir / URI (as export_checkpoint), or a model directory
    (raygpt or HF GPT-2) to convert. Writes `out` atomically in `format`."""
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: use {' or '.join(FORMATS)}")
    src = Path(str(source)).expanduser()
    if not is_uri(source) and _is_model_dir(src):
        return convert_model_dir(src, out, format, label=str(src))
    if format == "raygpt":
        return export_checkpoint(source, out)
    # checkpoint -> a raygpt dir in a temp place beside `out` -> HF
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.src", dir=out.parent))
    try:
        export_checkpoint(source, tmp / "m")
        return convert_model_dir(tmp / "m", out, "hf", label=None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """DCP checkpoint -> model.safetensors + config.json + tokenizer.json (one process,
    no process group: DCP assembles the full tensors from every rank's shard).
    `path` may be a local dir or a pyarrow URI (s3://...)."""
    import torch.distributed.checkpoint as dcp

    from raygpt.config import validate
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    if str(path).startswith("file://"):
        path = str(path)[len("file://"):]
    elif is_uri(path):
        path = download_checkpoint(str(path))
    ckpt = resolve_checkpoint(path)
    st = read_state(ckpt)
    cfg = validate(st["config"])
    model = GPT(GPTConfig(**st["model"]))
    sd = {"model": model.state_dict()}
    try:
        dcp.load(sd, checkpoint_id=str(ckpt))
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {str(ckpt)!r}: {str(e).splitlines()[0]}") from None
    model.load_state_dict(sd["model"])
    tok = ckpt / "tokenizer.json"
    return save_model_dir(
        model, out, tok if tok.is_file() else None,
        extra={"step": st["step"], "val_loss": st.get("val_loss"), "source": str(ckpt),
               "raygpt_config": cfg.to_dict()},
    )


def download_checkpoint(uri: str) -> Path:
    """A checkpoint (or run dir: its newest checkpoint) at a pyarrow URI -> local temp dir."""
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


def convert_model_dir(src: Path, out: str | os.PathLike, format: str, label: str | None) -> Path:
    """A model directory (either format) -> `out` in `format`. label: recorded as the
    source (None: keep the one the directory records, e.g. its checkpoint)."""
    from raygpt.model.io import TOKENIZER, load_model_dir, save_model_dir

    model, meta = load_model_dir(src)
    tok = src / TOKENIZER
    extra = {k: meta[k] for k in ("step", "val_loss", "raygpt_config") if k in meta}
    extra["source"] = label or meta.get("source")
    if format == "hf":
        from raygpt.model.chat import ChatTemplate
        from raygpt.model.hf import save_hf_dir

        # the template raygpt's chat endpoint uses for `src` (its chat_template.json, else built in)
        return save_hf_dir(model, out, tok, extra={**extra, "source_version": meta.get("version")},
                           chat_template=ChatTemplate.load(str(src)))
    return save_model_dir(model, out, tok if tok.is_file() else None, extra=extra)
