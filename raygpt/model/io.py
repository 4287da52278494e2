"""Exported model directories: model.safetensors + config.json + tokenizer.json.

Two formats share those file names and are told apart by config.json: raygpt's own
(a "model" section) and a Hugging Face GPT-2 directory (model_type gpt2; see
raygpt.model.hf). Every reader (train --init-from, eval, generate, serve, distill)
goes through read_model_config / load_model_dir and so takes both.

Loading never unpickles anything. The directory is written under a temp name and
renamed into place, so a reader never sees a half-written model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raygpt.model.files import CONFIG, TOKENIZER, WEIGHTS, ModelDirError, atomic_dir  # noqa: F401
from raygpt.model.gpt import GPT, GPTConfig

# lm_head.weight is tied to wte.weight: stored once.
_TIED = "lm_head.weight"


def save_model_dir(model: GPT, out: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                   extra: dict | None = None) -> Path:
    """Write the model (full, unsharded state dict on this process) atomically."""
    with atomic_dir(out) as tmp:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
              if k != _TIED}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        digest = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()[:12]
        meta = {"model": dataclasses.asdict(model.config), "version": digest, **(extra or {})}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    return Path(out)


def read_model_config(path: str | os.PathLike) -> dict:
    """-> raygpt's config.json contents; for a HF GPT-2 dir the same shape ("model":
    GPTConfig fields, "version", "format": "hf")."""
    from raygpt.model import hf

    p = Path(path)
    if not p.is_dir():
        raise ModelDirError(f"model directory {str(p)!r} does not exist")
    if not (p / CONFIG).is_file():
        hf.refuse_pickles(p)  # a pickle-only HF dir gets its reason
        raise ModelDirError(f"model directory {str(p)!r} has no {CONFIG} (export it with `raygpt export`)")
    try:
        meta = json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{str(p / CONFIG)!r}: invalid JSON ({e.msg})") from None
    if hf.is_hf_config(meta):
        return hf.read_hf_meta(p, meta)
    if not (p / WEIGHTS).is_file():
        hf.refuse_pickles(p)
        raise ModelDirError(f"model directory {str(p)!r} has no {WEIGHTS} (export it with `raygpt export`)")
    return meta


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> tuple[GPT, dict]:
    """-> (model in eval mode, config.json contents). Raises ModelDirError."""
    meta = read_model_config(path)
    if meta.get("format") == "hf":
        from raygpt.model.hf import load_hf_model

        model = load_hf_model(Path(path), meta)
        model.to(device=device, dtype=dtype).eval()
        return model, meta
    try:
        cfg = GPTConfig(**meta["model"])
    except (KeyError, TypeError) as e:
        raise ModelDirError(f"{str(Path(path) / CONFIG)!r}: bad 'model' section ({e})") from None
    model = GPT.empty(cfg)
    try:
        sd = load_file(str(Path(path) / WEIGHTS))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ModelDirError(f"{str(Path(path) / WEIGHTS)!r}: cannot read ({e})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != _TIED]
    if missing or unexpected:
        raise ModelDirError(
            f"{str(Path(path) / WEIGHTS)!r} does not match config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, meta
