"""Slow links: which rank's network path to the head is slow.

The own-work straggler check (raygpt.train.stragglers) cannot see a slow link: in a ring
all-reduce every rank waits as long as the slowest transfer, so all ranks' steps slow
alike. Each rank's heartbeat publisher (raygpt.train.heartbeat) times the round trip of
its KV put to the GCS on the head and publishes it as `rtt_ms`; the driver's watchdog
feeds the records here once a second. A rank whose median round trip over its last
`beats` beats is `factor` x the median of the other ranks' and above `floor_ms` is
flagged (an event with kind "link"). The median, not every beat in a row: a slowed link
is slow when it is loaded, and the all-reduces load it most of a step, not all of it.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

FLOOR_MS = 50.0  # below this no round trip is a problem, whatever the ratio


@dataclass
class LinkStragglerDetector:
    factor: float = 1.5
    beats: int = 5
    floor_ms: float = FLOOR_MS
    _gen: str | None = None
    _seq: dict = field(default_factory=dict)       # rank -> the last beat counted
    _rtts: dict = field(default_factory=dict)      # rank -> deque of round trips (ms)
    _flagged: set = field(default_factory=set)
    _good: dict = field(default_factory=dict)      # rank -> new beats under the bar in a row

    def update(self, recs: list[dict]) -> list[dict]:
        """The current group's latest heartbeat records (one per rank) -> new events. A
        rank is flagged once; it is cleared only after `beats` new beats in a row under
        the bar (a median hovering at the bar must not flap: one event per slow link),
        and can be flagged again after."""
        if not recs:
            return []
        gen = recs[0].get("gen")
        if gen != self._gen:  # a restarted group: new ranks, new links
            self._gen, self._seq, self._rtts, self._flagged, self._good = gen, {}, {}, set(), {}
        by_rank = {r["rank"]: r for r in recs if r.get("gen") == gen}
        fresh = set()
        for rank, r in by_rank.items():
            if r.get("rtt_ms") is not None and r.get("seq") != self._seq.get(rank):
                self._seq[rank] = r.get("seq")
                self._rtts.setdefault(rank, deque(maxlen=self.beats)).append(float(r["rtt_ms"]))
                fresh.add(rank)
        medians = {k: statistics.median(v) for k, v in self._rtts.items()}
        out = []
        for rank, q in self._rtts.items():
            others = [m for k, m in medians.items() if k != rank]
            if len(q) < self.beats or not others:
                continue
            base = statistics.median(others)
            mine = medians[rank]
            slow = mine >= self.floor_ms and mine >= self.factor * base
            if not slow:
                if rank in fresh:
                    self._good[rank] = self._good.get(rank, 0) + 1
                if self._good.get(rank, 0) >= self.beats:
                    self._flagged.discard(rank)
                continue
            self._good[rank] = 0
            if rank not in self._flagged:
                self._flagged.add(rank)
                rec = by_rank.get(rank, {})
                out.append({"kind": "link", "step": rec.get("step"), "rank": rank, "node": rec.get("node"),
                            "ratio": round(mine / base, 2) if base > 0 else None, "rtt_ms": round(mine, 1),
                            "others_ms": round(base, 1), "beats": self.beats})
        return out

    @property
    def flagged(self) -> set:
        return set(self._flagged)
