"""Step-indexed, seeded global batches over memory-mapped token shards.

The global batch for step k depends only on (seed, split, k): its G window start
positions are drawn uniformly (like nanoGPT's get_batch) from a numpy Generator seeded
with SeedSequence([seed, split_id, k]). Rank r of W takes rows [r*G/W, (r+1)*G/W).
So the global batch at step k is the same for any W that divides G, a restarted or resized
run continues the same data stream from its step, and memory per step is O(G * block).

Shards are memory-mapped (pyarrow.memory_map + ipc.open_file) and viewed as numpy with
zero copy: every worker maps the same files; the OS page cache holds one copy.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from raygpt.errors import UserError

_SPLIT_IDS = {"train": 0, "val": 1}


def _split_id(split: str) -> int:
    return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) & 0x7FFFFFFF)


class TokenSplit:
    """Concatenated, read-only, memory-mapped view over `data_dir/split/shard-*.arrow`."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        import pyarrow as pa

        self.data_dir = Path(data_dir)
        self.split = split
        d = self.data_dir / split
        shards = sorted(d.glob("shard-*.arrow")) if d.is_dir() else []
        if not shards:
            raise UserError(f"{self.data_dir} has no '{split}' shards ({d}/shard-*.arrow): "
                            f"run `raygpt prepare --out {self.data_dir}`")
        self.shards = shards
        self._arrays: list[np.ndarray] = []
        for f in shards:
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
                for i in range(reader.num_record_batches):
                    col = reader.get_batch(i).column("tokens")
                    if len(col):
                        self._arrays.append(col.to_numpy(zero_copy_only=True))
            except (pa.ArrowInvalid, KeyError, OSError) as e:
                raise UserError(f"token shard {f} is unreadable: {str(e).splitlines()[0]}") from None
        if not self._arrays:
            raise UserError(f"the '{split}' split of {self.data_dir} has no tokens")
        self.dtype = self._arrays[0].dtype
        lens = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self._ends = np.cumsum(lens)  # exclusive end offset of each array
        self._starts = self._ends - lens
        self.num_tokens = int(self._ends[-1])

    def __len__(self) -> int:
        return self.num_tokens

    def __reduce__(self):  # reopen the maps in another process instead of pickling data
        return (TokenSplit, (str(self.data_dir), self.split))

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] (a zero-copy view when it lies inside one shard)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) is outside the {self.split} split "
                             f"({self.num_tokens} tokens)")
        i = int(np.searchsorted(self._ends, start, side="right"))
        off = start - int(self._starts[i]) if i < len(self._arrays) else 0
        if length == 0:
            return np.zeros(0, dtype=self.dtype)
        a = self._arrays[i]
        if off + length <= len(a):
            return a[off:off + length]
        parts, need = [], length
        while need > 0:
            a = self._arrays[i]
            take = min(need, len(a) - off)
            parts.append(a[off:off + take])
            need -= take
            i, off = i + 1, 0
        return np.concatenate(parts)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) array of windows tokens[s:s+length]."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(self._arrays) == 1:
            idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
            return self._arrays[0][idx]
        out = np.empty((len(starts), length), dtype=self.dtype)
        for j, s in enumerate(starts):
            out[j] = self.read(s, length)
        return out


class BatchLoader:
    """`get(step)` -> (x, y) int64 CPU tensors of shape (global_batch // dp_size, block_size)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, block_size: int,
                 global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        if block_size < 1:
            raise UserError(f"model.block_size={block_size} must be at least 1")
        if global_batch < 1:
            raise UserError(f"train.global_batch={global_batch} must be at least 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"data-parallel rank {dp_rank} is outside a group of size {dp_size}")
        if global_batch % dp_size:
            raise UserError(f"train.global_batch={global_batch} is not divisible by the "
                            f"data-parallel size {dp_size}")
        self.tokens = TokenSplit(data_dir, split)
        if block_size + 1 > self.tokens.num_tokens:
            raise UserError(f"model.block_size={block_size} is larger than the data split "
                            f"'{split}' of {data_dir} ({self.tokens.num_tokens} tokens)")
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.global_batch, self.seed = block_size, global_batch, int(seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch = global_batch // dp_size
        self.num_windows = self.tokens.num_tokens - block_size  # valid starts: [0, num_windows)

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def global_starts(self, step: int) -> np.ndarray:
        """The G window start positions of global batch `step` (the same for every rank)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        ss = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, _split_id(self.split), int(step)])
        rng = np.random.Generator(np.random.PCG64(ss))
        return rng.integers(0, self.num_windows, size=self.global_batch, dtype=np.int64)

    def local_starts(self, step: int) -> np.ndarray:
        lo = self.dp_rank * self.local_batch
        return self.global_starts(step)[lo:lo + self.local_batch]

    def get(self, step: int):
        import torch

        w = self.tokens.gather(self.local_starts(step), self.block_size + 1).astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(w[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(w[:, 1:]))
        return x, y

    def get_micro(self, step: int, micro_batch: int):
        """This rank's slice of batch `step` as a list of (x, y) chunks of micro_batch rows."""
        if micro_batch < 1 or self.local_batch % micro_batch:
            raise UserError(f"train.micro_batch={micro_batch} does not divide the per-rank batch "
                            f"{self.local_batch} (train.global_batch={self.global_batch} / "
                            f"data-parallel size {self.dp_size})")
        x, y = self.get(step)
        return [(x[i:i + micro_batch], y[i:i + micro_batch])
                for i in range(0, self.local_batch, micro_batch)]

