"""The model runner: one GPT model and its preallocated KV cache; runs batched forwards
over cache slots (decode rows and prefill chunks alike)."""
from __future__ import annotations

import torch

from raygpt.model.gpt import GPT, KVCache, as_slots
from raygpt.serving.transfer import to_device


class ModelRunner:
    """model: a GPT in eval mode (any device/dtype); n_slots: KV-cache slots."""

    def __init__(self, model: GPT, n_slots: int):
        self.model = model.eval()
        self.cfg = model.config
        self.block_size = self.cfg.block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_slots = n_slots
        self.cache = KVCache(self.cfg, n_slots, device=self.device, dtype=self.dtype)

    def forward(self, idx: torch.Tensor, slots: list[int], pos: list[int],
                last: list[int] | None = None):
        """GPT.forward_cached with the head at chosen positions only: `last[b]` is the
        position within row b whose logits are wanted -> (B,1,V); None -> every position
        (B,T,V). slots, pos and last are host ints (nothing is read back from the device).
        Padding beyond a row's chunk writes junk k/v in its slot that the next chunk or
        decode step overwrites before any query can see it."""
        m = self.model
        B, T = idx.shape
        dev = idx.device
        L = max(pos) + T  # host ints: reading qpos.max() back would sync with the device
        if L > self.block_size:
            raise ValueError(f"position {L - 1} >= block_size {self.block_size}")
        slots = as_slots(slots, "cpu")  # a slice when consecutive, else a host tensor
        if not isinstance(slots, slice):
            slots = to_device(slots, torch.long, dev)
        pos = to_device(pos, torch.long, dev)
        qpos = pos[:, None] + torch.arange(T, device=dev)[None, :]
        attn_mask = torch.arange(L, device=dev)[None, None, :] <= qpos[:, :, None]
        x = m.wte(idx) + m.wpe(qpos)
        for block, layer_cache in zip(m.blocks.values(), self.cache.layers):
            x = block.forward_cached(x, layer_cache, slots, pos, attn_mask)
        if last is not None:
            x = x[torch.arange(B, device=dev), to_device(last, torch.long, dev)][:, None]
        return m.lm_head(m.ln_f(x))

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Keys and values of positions 0..n-1 from slot src into slot dst (a prompt
        prefilled once, shared), on the device."""
        for kc, vc in self.cache.layers:
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
