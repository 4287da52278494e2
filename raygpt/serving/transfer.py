"""Host <-> device moves of the engine's step. `read_host` is the one device->host read
a step makes (the sampled tokens, with their logprobs in the same transfer): on a GPU
every other read of a device tensor (`int(t)`, `t.tolist()`, `float(t[i])`) would wait
for the whole step's kernels. Positions and lengths stay on the host as Python ints."""
from __future__ import annotations

import torch


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or CPU tensor) on `device`; from pinned memory, without blocking, on
    a GPU (a pageable copy may wait for the stream)."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def read_host(t: torch.Tensor) -> list:
    """The step's one device->host transfer (the caller packs what it needs into `t`)."""
    return t.tolist()
