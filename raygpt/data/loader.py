"""Step-indexed, seeded global batches over memory-mapped token shards.

The global batch for step k depends only on (seed, split, k, sampling):

- `random` (nanoGPT's get_batch): G window starts drawn uniformly, with replacement, from
  a numpy Generator seeded with SeedSequence([seed, split_id, k]).
- `epoch`: the split is cut into W = (tokens - 1) // block non-overlapping windows; epoch
  e visits them in a seeded permutation (SeedSequence([seed, split_id, e])), and step k
  takes positions k*G .. k*G+G-1 of the endless sequence epoch 0, epoch 1, ...

Rank r of W takes rows [r*G/W, (r+1)*G/W). So the global batch at step k is the same for
any world size that divides G, a restarted or resized run continues the same data stream
from its step (the epoch position is a function of the step: `position(step)`), and
memory per step is O(G * block).

Shards are memory-mapped (pyarrow.memory_map + ipc.open_file) and viewed as numpy with
zero copy: every worker on a node maps the same files; the OS page cache holds one copy.
A data directory prepared on a storage URI is read through `local_data_dir`: meta.json
and tokenizer.json are copied into the node-local cache ($RAYGPT_CACHE_DIR/remote/...)
at once, each shard the first time a window needs it. `BatchLoader` builds the next
step's batch in a background thread (fetching its shards), pinned when CUDA is present.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from raygpt.data.store import SOURCE_FILE, _fetch, local_data_dir  # noqa: F401  (local_data_dir: re-exported)
from raygpt.errors import UserError
from raygpt.files import is_uri

_SPLIT_IDS = {"train": 0, "val": 1}
SAMPLING = ("random", "epoch")


def _split_id(split: str) -> int:
    return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- where


def worker_data_dir(data_cfg, driver_dir=None) -> Path:
    """Where a training worker reads its data on this node: the driver's directory when it
    is here too, else data.path (a URI through the node-local cache; a local path must
    exist here), else the bundled corpus / data.corpus prepared on this node."""
    from raygpt.data.prepare import ensure_data
    from raygpt.data.store import META_FILE

    if driver_dir and (Path(driver_dir) / META_FILE).is_file():
        return Path(driver_dir)
    if data_cfg.path:
        return local_data_dir(data_cfg.path)
    return Path(ensure_data(data_cfg))


# ----------------------------------------------------------------------------- tokens


class TokenSplit:
    """Concatenated, read-only, memory-mapped view over the shards of one split."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        meta_f = self.data_dir / "meta.json"
        meta = json.loads(meta_f.read_text(encoding="utf-8")) if meta_f.is_file() else {}
        src = self.data_dir / SOURCE_FILE
        self._remote = json.loads(src.read_text())["uri"] if src.is_file() else None
        self._lock = threading.Lock()
        listed = (meta.get("shards") or {}).get(split)
        if listed is not None:
            self.shards = [self.data_dir / x["file"] for x in listed]
            lens = np.array([int(x["tokens"]) for x in listed], dtype=np.int64)
            self._parts: list = [None] * len(self.shards)
        else:  # format 1: every shard-*.arrow of the split directory
            d = self.data_dir / split
            self.shards = sorted(d.glob("shard-*.arrow")) if d.is_dir() else []
            self._parts = [self._open(f) for f in self.shards]
            lens = np.array([p[1][-1] if len(p[1]) else 0 for p in self._parts], dtype=np.int64)
        if not self.shards:
            raise UserError(f"{self.data_dir} has no '{split}' shards ({self.data_dir / split}/"
                            f"shard-*.arrow): run `raygpt prepare --out {self.data_dir}`")
        if self._remote is None:
            for i, f in enumerate(self.shards):
                if self._parts[i] is None:
                    self._parts[i] = self._open(f)
        if int(lens.sum()) == 0:
            raise UserError(f"the '{split}' split of {self.data_dir} has no tokens")
        first = self._parts[0]
        self.dtype = np.dtype(meta.get("dtype") or (first[0][0].dtype if first and first[0] else "uint16"))
        self._ends = np.cumsum(lens)
        self._starts = self._ends - lens
        self.num_tokens = int(self._ends[-1])

    def _open(self, f: Path):
        """-> (list of numpy views of the record batches, their cumulative ends)."""
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
            arrays = []
            for i in range(reader.num_record_batches):
                col = reader.get_batch(i).column("tokens")
                if len(col):
                    arrays.append(col.to_numpy(zero_copy_only=True))
        except (pa.ArrowInvalid, KeyError, OSError) as e:
            raise UserError(f"token shard {f} is unreadable: {str(e).splitlines()[0]}") from None
        return arrays, np.cumsum([len(a) for a in arrays], dtype=np.int64)

    def _shard(self, i: int):
        p = self._parts[i]
        if p is not None:
            return p
        with self._lock:
            if self._parts[i] is None:
                f = self.shards[i]
                if not f.is_file():
                    from raygpt.data.sources import filesystem

                    fs, base = filesystem(self._remote)
                    rel = f.relative_to(self.data_dir).as_posix()
                    try:
                        _fetch(fs, f"{base.rstrip('/')}/{rel}", f)
                    except Exception as e:  # noqa: BLE001
                        raise UserError(f"token shard {self._remote}/{rel} is unreadable: "
                                        f"{str(e).splitlines()[0] if str(e) else e}") from None
                self._parts[i] = self._open(f)
            return self._parts[i]

    def shards_for(self, starts: np.ndarray, length: int) -> set[int]:
        """Indices of the shards that windows [s, s+length) touch."""
        starts = np.asarray(starts, dtype=np.int64)
        a = np.searchsorted(self._ends, starts, side="right")
        b = np.searchsorted(self._ends, starts + max(length, 1) - 1, side="right")
        out: set[int] = set()
        for x, y in zip(a.tolist(), b.tolist()):
            out.update(range(x, min(y, len(self.shards) - 1) + 1))
        return out

    def fetch(self, shard_ids) -> None:
        for i in sorted(shard_ids):
            self._shard(i)

    def __len__(self) -> int:
        return self.num_tokens

    def __reduce__(self):  # reopen the maps in another process instead of pickling data
        return (TokenSplit, (str(self.data_dir), self.split))

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] (a zero-copy view when it lies inside one batch)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) is outside the {self.split} split "
                             f"({self.num_tokens} tokens)")
        if length == 0:
            return np.zeros(0, dtype=self.dtype)
        parts, need, pos = [], length, start
        while need > 0:
            i = int(np.searchsorted(self._ends, pos, side="right"))
            arrays, ends = self._shard(i)
            off = pos - int(self._starts[i])
            j = int(np.searchsorted(ends, off, side="right"))
            boff = off - (int(ends[j - 1]) if j else 0)
            a = arrays[j]
            take = min(need, len(a) - boff)
            parts.append(a[boff:boff + take])
            need -= take
            pos += take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) array of windows tokens[s:s+length]."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(self.shards) == 1:
            arrays, _ = self._shard(0)
            if len(arrays) == 1:
                idx = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
                return arrays[0][idx]
        out = np.empty((len(starts), length), dtype=self.dtype)
        for j, s in enumerate(starts):
            out[j] = self.read(s, length)
        return out


# ----------------------------------------------------------------------------- batches


class BatchLoader:
    """`get(step)` -> (x, y) int64 CPU tensors of shape (global_batch // dp_size, block_size).

    sampling: "random" | "epoch" (see the module doc). prefetch: build step+1's batch in a
    background thread after each get. pin_memory None = when CUDA is available."""

    def __init__(self, data_dir: str | os.PathLike, split: str, block_size: int,
                 global_batch: int, seed: int, dp_rank: int = 0, dp_size: int = 1, *,
                 sampling: str = "random", prefetch: bool = True, pin_memory: bool | None = None):
        if block_size < 1:
            raise UserError(f"model.block_size={block_size} must be at least 1")
        if global_batch < 1:
            raise UserError(f"train.global_batch={global_batch} must be at least 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise UserError(f"data-parallel rank {dp_rank} is outside a group of size {dp_size}")
        if global_batch % dp_size:
            raise UserError(f"train.global_batch={global_batch} is not divisible by the "
                            f"data-parallel size {dp_size}")
        if sampling not in SAMPLING:
            raise UserError(f"data.sampling={sampling!r}: use 'random' or 'epoch'")
        data_dir = local_data_dir(data_dir) if is_uri(data_dir) else data_dir
        self.tokens = TokenSplit(data_dir, split)
        if block_size + 1 > self.tokens.num_tokens:
            raise UserError(f"model.block_size={block_size} is larger than the data split "
                            f"'{split}' of {data_dir} ({self.tokens.num_tokens} tokens)")
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.global_batch, self.seed = block_size, global_batch, int(seed)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampling = sampling
        self.local_batch = global_batch // dp_size
        self.num_windows = self.tokens.num_tokens - block_size  # random starts: [0, num_windows)
        self.epoch_windows = (self.tokens.num_tokens - 1) // block_size  # epoch: non-overlapping
        if pin_memory is None:
            import torch

            pin_memory = torch.cuda.is_available()
        self.pin_memory = pin_memory
        self._perm: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raygpt-prefetch") if prefetch else None
        self._next: tuple[int, object] | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    def _rng(self, *key: int) -> np.random.Generator:
        ss = np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, _split_id(self.split), *key])
        return np.random.Generator(np.random.PCG64(ss))

    def _permutation(self, epoch: int) -> np.ndarray:
        p = self._perm.get(epoch)
        if p is None:
            if len(self._perm) >= 2:
                self._perm.pop(min(self._perm))
            # A separate stream from `random`'s step keys: tag 1 << 32 + epoch.
            p = self._perm[epoch] = self._rng((1 << 32) + int(epoch)).permutation(self.epoch_windows)
        return p

    def position(self, step: int) -> dict:
        """Where step `step` starts in the epoch sequence (for checkpoints and logs)."""
        pos = int(step) * self.global_batch
        w = self.epoch_windows
        return {"sampling": self.sampling, "epoch": pos // w, "window": pos % w,
                "windows_per_epoch": w}

    def global_starts(self, step: int) -> np.ndarray:
        """The G window start positions of global batch `step` (the same for every rank)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.sampling == "random":
            return self._rng(int(step)).integers(0, self.num_windows, size=self.global_batch,
                                                 dtype=np.int64)
        pos = int(step) * self.global_batch + np.arange(self.global_batch, dtype=np.int64)
        epochs, idx = pos // self.epoch_windows, pos % self.epoch_windows
        out = np.empty(self.global_batch, dtype=np.int64)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            out[m] = self._permutation(e)[idx[m]]
        return out * self.block_size

    def local_starts(self, step: int) -> np.ndarray:
        lo = self.dp_rank * self.local_batch
        return self.global_starts(step)[lo:lo + self.local_batch]

    def _build(self, step: int):
        import torch

        w = self.tokens.gather(self.local_starts(step), self.block_size + 1).astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(w[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(w[:, 1:]))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def get(self, step: int):
        nxt, self._next = self._next, None
        if nxt is not None and nxt[0] == step:
            x, y = nxt[1].result()
        else:
            x, y = self._build(step)
        if self._pool is not None:
            self._next = (step + 1, self._pool.submit(self._build, step + 1))
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):  # noqa: D105 - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
