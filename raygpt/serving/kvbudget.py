"""The KV-cache memory budget (vLLM's `gpu_memory_utilization`, for the KV cache alone):
a fraction of the device's memory (GPU memory; on a CPU the RAM, or the cgroup's limit
when lower), or an explicit byte count. An engine's slots are derived from it,
`min(max_slots, available // bytes_per_slot)`, where `available` is the budget less what
other live engines of this process hold on the same device (the old model's cache while
a swap overlaps it). Not even one slot available -> `KVBudgetError`, a one-line refusal
naming the budget. An engine gives its bytes back when its loop ends (close/abort), when
it drops its cache tensors."""
from __future__ import annotations

import itertools
import os
import threading
import weakref

import torch

from raygpt.errors import UserError
from raygpt.serving.constants import DEFAULT_KV_MEMORY_FRACTION


class KVBudgetError(UserError):
    """The model's KV cache for one slot does not fit in the budget. `fits_alone`: it
    would once the other engines' caches are freed (a swap can drain the old model
    first, then load the new one)."""

    def __init__(self, message: str, fits_alone: bool = False):
        super().__init__(message)
        self.fits_alone = fits_alone


def kv_bytes_per_slot(cfg, dtype: torch.dtype, n_head: int | None = None) -> int:
    """layers x 2 (keys, values) x heads x head_dim x block_size x dtype size."""
    h = n_head or cfg.n_head
    d = cfg.n_embd // cfg.n_head
    return cfg.n_layer * 2 * h * d * cfg.block_size * torch.empty((), dtype=dtype).element_size()


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(path).read().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < (1 << 60):
            return int(v)
    return None


def device_memory_bytes(device: torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def resolve_budget(device: torch.device, fraction: float | None = None,
                   nbytes: int | None = None) -> tuple[int, str]:
    """-> (budget in bytes, how it was set: for messages)."""
    if nbytes is not None:
        return int(nbytes), f"kv_memory_bytes={nbytes}"
    fraction = DEFAULT_KV_MEMORY_FRACTION if fraction is None else fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_memory_fraction must be in (0, 1], got {fraction}")
    total = device_memory_bytes(device)
    kind = "GPU memory" if torch.device(device).type == "cuda" else "RAM"
    return int(total * fraction), f"kv_memory_fraction={fraction} of {fmt_bytes(total)} {kind}"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable


def plan_slots(per_slot: int, max_slots: int, budget: int, held: int = 0,
               what: str = "the budget", model: str = "this model", device: str = "") -> int:
    """Slots for a new cache: min(max_slots, (budget - held) // per_slot); < 1 -> KVBudgetError."""
    avail = budget - held
    slots = min(max_slots, max(0, avail) // per_slot)
    if slots < 1:
        others = f", {fmt_bytes(held)} of it held by another model's cache still serving" if held else ""
        raise KVBudgetError(
            f"{model} needs {fmt_bytes(per_slot)} of KV cache for one slot but the KV budget on "
            f"{device or 'this device'} is {fmt_bytes(budget)} ({what}){others}: raise "
            "kv_memory_fraction or kv_memory_bytes, or serve a smaller model or block_size",
            fits_alone=per_slot <= budget)
    return slots


class _Ledger:
    """KV-cache bytes held by this process's live engines, per device."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[str, dict[int, int]] = {}
        self._keys = itertools.count()

    def held(self, device: str) -> int:
        with self._lock:
            return sum(self._held.get(device, {}).values())

    def reserve(self, device: str, per_slot: int, max_slots: int, budget: int, what: str,
                model: str, owner: object) -> tuple[int, int]:
        """Atomically plan and book a cache for `owner` -> (slots, key); released by
        `release(key)` or when the owner is garbage-collected."""
        with self._lock:
            held = sum(self._held.get(device, {}).values())
            slots = plan_slots(per_slot, max_slots, budget, held, what, model, device)
            key = next(self._keys)
            self._held.setdefault(device, {})[key] = slots * per_slot
        weakref.finalize(owner, self.release, device, key)
        return slots, key

    def release(self, device: str, key: int) -> None:
        with self._lock:
            self._held.get(device, {}).pop(key, None)


LEDGER = _Ledger()


def device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)
