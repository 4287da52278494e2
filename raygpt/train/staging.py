"""Host staging for async checkpoints: one set of (pinned) buffers, reused by every save.

DCP's DefaultStager is not usable across the torch versions we meet: in torch 2.11 (the
GPU image's) its stage() ends with close(), which drops the cached buffers and clears the
copy dispatch table, so the *second* save through the same stager raises
``KeyError: <class 'type'>``; in 2.13 it keeps them. This stager is ours: it walks the
state dict, copies every tensor into a buffer it keeps per key path (pinned when CUDA is
there), with non-blocking copies and one synchronize at the end, so training may change
the weights as soon as stage() returns. The next save starts only after the previous
write finished (CheckpointManager.save waits first), so a buffer is never reused while
the writer thread still reads it.

With shared=True (checkpoint.async_mode=process) the buffers are allocated in shared
memory (and registered as pinned with CUDA), so handing the staged dict to the checkpoint
process sends handles: pickling a private buffer would copy it into shared memory at every
save, and a pinned one would lose its pinning.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.staging import AsyncStager


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


class PinnedStager(AsyncStager):
    """AsyncStager for dcp.async_save: stage() returns a host copy of the state dict whose
    tensors live in buffers allocated at the first save and reused after."""

    _synchronize_after_execute = False

    def __init__(self, pin: bool | None = None, shared: bool = False):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.shared = shared
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._registered: dict[tuple, int] = {}  # path -> pointer of a cudaHostRegister'ed shared buffer
        self.allocations = 0  # buffers allocated so far (a second save adds none)
        self._dtensor = _dtensor_type()

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict):
        self._memo: dict[tuple, torch.Tensor] = {}  # views of one storage (tied weights): one copy
        out = self._copy(state_dict, ())
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking device->host copies have landed
        return out

    def synchronize_staging(self) -> None:  # stage() is synchronous
        pass

    def close(self) -> None:
        for path in list(self._registered):
            self._unregister(path)
        self._bufs.clear()

    def _unregister(self, path: tuple) -> None:
        """Unpin a shared buffer before it is dropped (its memory is then freed)."""
        ptr = self._registered.pop(path, None)
        if ptr is not None:
            torch.cuda.synchronize()  # no copy into it is still in flight
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def _alloc(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        pin = self.pin and t.device.type == "cuda"
        self._unregister(path)  # a buffer of another shape is replaced
        if not self.shared:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        buf = torch.empty(t.shape, dtype=t.dtype).share_memory_()
        if pin and buf.numel():
            # cudaHostRegisterPortable: pinned for every CUDA context, like pin_memory.
            err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 1))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of a {tuple(buf.shape)} staging buffer failed: cudaError {err}")
            self._registered[path] = buf.data_ptr()
        return buf

    # ---------------------------------------------------------------- walk
    def _copy(self, x, path: tuple):
        if isinstance(x, self._dtensor):
            local = self._tensor(x._local_tensor, path)
            # Same sharding spec, host-resident local shard: what DCP's planner writes.
            return self._dtensor(local, x._spec, requires_grad=False)
        if isinstance(x, torch.Tensor):
            return self._tensor(x, path)
        if isinstance(x, dict):
            return {k: self._copy(v, (*path, k)) for k, v in x.items()}
        if isinstance(x, list):
            return [self._copy(v, (*path, i)) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return tuple(self._copy(v, (*path, i)) for i, v in enumerate(x))
        return x  # ints, floats, strings: immutable

    def _tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        t = t.detach()
        alias = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        if alias in self._memo:
            return self._memo[alias]
        buf = self._bufs.get(path)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._alloc(t, path)
            self._bufs[path] = buf
            self.allocations += 1
        buf.copy_(t, non_blocking=t.device.type == "cuda")
        self._memo[alias] = buf
        return buf
