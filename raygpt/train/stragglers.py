"""Straggler detection: each rank times its own work in a step (reading its batch, the
forward passes: what it computes before it waits on the others; under DDP every rank's
step lasts as long as the slowest one's, so the step time says nothing), the per-step
agreement gathers those times (no extra collective), and rank 0 flags a rank whose own
work takes `factor` x the others' median for `steps` steps in a row.
"""
from __future__ import annotations

import collections
import contextlib
import statistics
import time
from dataclasses import dataclass, field


class ComputeClock:
    """Seconds of forward compute since the last take(). On a GPU, CUDA events (read
    once complete, so no sync is added); on the CPU, the wall clock."""

    def __init__(self, device=None):
        self.cuda = device is not None and getattr(device, "type", "cpu") == "cuda"
        self._cpu_s = 0.0
        self._events: list = []

    @contextlib.contextmanager
    def span(self):
        if self.cuda:
            import torch

            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self._events.append((a, b))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu_s += time.perf_counter() - t0

    def take(self) -> float:
        s, self._cpu_s = self._cpu_s, 0.0
        keep = []
        for a, b in self._events:
            if b.query():
                s += a.elapsed_time(b) / 1000
            else:
                keep.append((a, b))
        self._events = keep
        return s


@dataclass
class StragglerDetector:
    factor: float = 1.5
    steps: int = 5
    nodes: list = field(default_factory=list)  # node id per rank, for the event
    _window: dict = field(default_factory=dict)  # rank -> its last `steps` ratios
    _flagged: set = field(default_factory=set)

    def update(self, step: int, own_s: list[float]) -> list[dict]:
        """One step's own-work seconds per rank -> new `straggler` events. A rank is
        flagged when the median of its last `steps` ratios (own work / the others'
        median) reaches `factor`, and cleared when that median falls under it: one noisy
        step on a busy machine neither flags nor clears it; a flagged rank is flagged
        again only after it was cleared."""
        if len(own_s) < 2:
            return []
        out = []
        for r, t in enumerate(own_s):
            others = [x for i, x in enumerate(own_s) if i != r]
            med = statistics.median(others)
            w = self._window.setdefault(r, collections.deque(maxlen=self.steps))
            w.append(t / med if med > 0 else 1.0)
            if len(w) < self.steps:
                continue
            ratio = statistics.median(w)
            if ratio < self.factor:
                self._flagged.discard(r)
            elif r not in self._flagged:
                self._flagged.add(r)
                out.append({"step": step, "rank": r, "ratio": round(ratio, 2),
                            "node": self.nodes[r] if r < len(self.nodes) else None,
                            "own_ms": round(1000 * t, 2), "others_median_ms": round(1000 * med, 2),
                            "steps": self.steps})
        return out

    @property
    def flagged(self) -> set:
        return set(self._flagged)
