"""`raygpt export`: a checkpoint (or a model directory) -> a model directory in raygpt's
format or as a Hugging Face GPT-2 directory (--format hf)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raygpt.errors import UserError
from raygpt.files import is_uri

FORMATS = ("raygpt", "hf")


def _is_model_dir(p: Path) -> bool:
    """config.json beside weights (a checkpoint holds DCP shards and raygpt_state.json)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (p / "config.json").is_file() and any((p / w).is_file() for w in weights)


def export_to(source: str | os.PathLike, out: str | os.PathLike, format: str = "raygpt") -> Path:
    """source: a checkpoint / run dir / URI (as export_checkpoint), or a model directory
    (raygpt or HF GPT-2) to convert. Writes `out` atomically in `format`."""
    from raygpt.train.checkpoint import export_checkpoint

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
