"""Evaluate an exported model directory on held-out data.

The val loss is the mean cross-entropy over `steps` fixed batches of the val split
(BatchLoader batches 0..steps-1 with a fixed seed), so two models evaluated with the same
data, batch, block size and seed see exactly the same tokens: promotion compares them on
that basis. Perplexity = exp(val loss). tokens/s is the forward throughput of the eval.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from raygpt.errors import UserError

DEFAULT_STEPS = 20
DEFAULT_BATCH = 16
DEFAULT_SEED = 1234


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    return torch.device(device)


def evaluate_model(model_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                   steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
                   block_size: int | None = None, seed: int = DEFAULT_SEED, samples: int = 3,
                   sample_tokens: int = 64, prompt_tokens: int = 16, device: str = "auto",
                   log: Callable[[str], None] | None = None) -> dict:
    """-> {"val_loss", "perplexity", "tokens_per_s", "samples", ...} (JSON-serializable).

    data_dir None: the model's own training data (see lifecycle.data.data_for_model).
    block_size None: the model's context length (a smaller one may be given so that two
    models with different contexts are compared on the same windows)."""
    import torch

    from raygpt.data.loader import BatchLoader
    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.lifecycle.data import check_same_tokenizer, data_for_model
    from raygpt.model.io import load_model_dir

    if steps < 1 or batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1")
    model_dir = Path(model_dir).expanduser()
    data_dir = data_for_model(model_dir, data_dir, log) if data_dir is None else Path(data_dir)
    check_same_tokenizer(model_dir, data_dir)
    dev = _device(device)
    model, meta = load_model_dir(model_dir, device=dev)
    model.eval()
    block = block_size or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"block_size={block} is larger than the model's context "
                        f"({model.config.block_size})")
    loader = BatchLoader(data_dir, "val", block, batch_size, seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    total, n_tokens = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(steps):
            x, y = loader.get(k)
            x, y = x.to(dev), y.to(dev)
            if amp is not None:
                with amp:
                    _, loss = model(x, y)
            else:
                _, loss = model(x, y)
            total += float(loss)
            n_tokens += x.numel()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    val_loss = total / steps

    outs = []
    if samples > 0:
        tok = load_tokenizer(model_dir / "tokenizer.json")
        plen = max(1, min(prompt_tokens, block - 1, loader.num_tokens - 1))
        n_new = max(1, min(sample_tokens, model.config.block_size - plen))
        starts = BatchLoader(data_dir, "val", plen, samples, seed + 1).global_starts(0)
        for s in starts:
            ids = loader.tokens.read(int(s), plen).astype("int64")
            idx = torch.tensor([ids.tolist()], device=dev)
            with torch.no_grad():
                out = model.generate(idx, n_new, temperature=0.0)
            outs.append({"prompt": tok.decode(ids.tolist()),
                         "completion": tok.decode(out[0, plen:].tolist())})
    return {
        "model_dir": str(model_dir),
        "version": meta.get("version"),
        "params": model.num_params(),
        "data_dir": str(data_dir),
        "split": "val",
        "steps": steps,
        "batch_size": batch_size,
        "block_size": block,
        "seed": seed,
        "tokens": n_tokens,
        "val_loss": val_loss,
        "perplexity": math.exp(min(val_loss, 700.0)),
        "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
        "seconds": round(seconds, 3),
        "device": str(dev),
        "samples": outs,
    }


def compare_models(candidate: str | os.PathLike, baseline: str | os.PathLike,
                   data_dir: str | os.PathLike | None = None, *, steps: int = DEFAULT_STEPS,
                   batch_size: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED, device: str = "auto",
                   log: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """Both models on the same held-out windows: the same data (default: the baseline's
    training data), batches, seed and block size (the smaller context of the two)."""
    from raygpt.lifecycle.data import check_same_tokenizer, data_for_model
    from raygpt.model.io import read_model_config

    data = data_for_model(baseline, data_dir, log)
    check_same_tokenizer(candidate, data, what="candidate")
    block = min(read_model_config(candidate)["model"]["block_size"],
                read_model_config(baseline)["model"]["block_size"])
    kw = dict(steps=steps, batch_size=batch_size, block_size=block, seed=seed, samples=0,
              device=device)
    return (evaluate_model(candidate, data, **kw, log=log),
            evaluate_model(baseline, data, **kw, log=log))
