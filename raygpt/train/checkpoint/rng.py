"""Each rank's random generator state in a checkpoint: rng/rank<r>.pt."""
from __future__ import annotations

import json
import os
from pathlib import Path

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
