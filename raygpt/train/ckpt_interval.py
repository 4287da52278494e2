"""`checkpoint.every: auto`: when to save, from measured costs (Young's interval).

A save blocks training for C seconds; a failure loses the work since the last save plus
a restart. With failures every M seconds on average, saving every sqrt(2 C M) seconds
loses the least (Young 1974; raygpt.train.goodput_model). Both inputs are measured:

- C: the median of this run's last saves' blocked time (rank 0's `checkpoint` events,
  earlier groups' and launches' included); a run that has none saves at its first
  agreed step to measure one (an interval from a guessed cost is a guess: with 1 s
  guessed and 0.1 s real, the first interval came out 85 s instead of 27 s);
- M: `run.mtbf_s` when given; else the run's own failure rate, its wall time so far
  over the failures the goodput ledger counted (groups that died; a preemption that
  checkpointed first is no failure); before the first failure, max(PRIOR_MTBF_S, the
  wall time so far): no failure in W seconds says the MTBF is likely more than W.

Rank 0 alone decides (its clock); the trainer's per-step agreement carries the decision
to every rank, so all save at the same step. Pure: the caller gives the clock.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from raygpt.train.goodput_model import young_interval

PRIOR_SAVE_S = 1.0       # a save's cost before any was measured
PRIOR_MTBF_S = 3600.0    # the MTBF assumed before this run saw a failure
SAVES_KEPT = 5           # the save cost is the median of this many latest saves
RELOG_CHANGE = 0.10      # an interval that moved this much (relative) is logged again


@dataclass
class History:
    """What the run's metrics.jsonl says at a group's start."""
    wall_s: float = 0.0      # the run's wall time so far (every launch; the goodput ledger)
    failures: int = 0        # groups that died (the ledger's count)
    saves_s: list = field(default_factory=list)  # blocked seconds of earlier saves, oldest first

    @classmethod
    def from_records(cls, records: list[dict], now: float) -> "History":
        from raygpt.train.goodput import ledger

        led = ledger(records, now=now)
        saves = [float(r["blocked_s"]) for r in records
                 if r.get("event") == "checkpoint" and isinstance(r.get("blocked_s"), (int, float))]
        return cls(wall_s=led.wall_s, failures=led.failures, saves_s=saves[-SAVES_KEPT:])


@dataclass
class AutoInterval:
    mtbf_s: float | None        # run.mtbf_s (None: the run's own failure rate)
    history: History
    t_start: float              # the clock when this group began (its restored state is saved)
    _saves: deque = field(default_factory=lambda: deque(maxlen=SAVES_KEPT))
    _last_save_t: float = 0.0
    _logged_s: float | None = None

    def __post_init__(self):
        self._saves.extend(self.history.saves_s)
        self._last_save_t = self.t_start

    # ------------------------------------------------------------------ inputs
    def saved(self, now: float, blocked_s: float) -> None:
        self._saves.append(max(0.0, float(blocked_s)))
        self._last_save_t = now

    def save_s(self) -> float:
        return statistics.median(self._saves) if self._saves else PRIOR_SAVE_S

    def mtbf(self, now: float) -> tuple[float, str]:
        """(seconds, where it came from)."""
        wall = self.history.wall_s + max(0.0, now - self.t_start)
        if self.mtbf_s is not None:
            return float(self.mtbf_s), "run.mtbf_s"
        if self.history.failures:
            return wall / self.history.failures, f"observed: {self.history.failures} failure(s) in {wall:.0f} s"
        return max(PRIOR_MTBF_S, wall), f"assumed: no failure in {wall:.0f} s of this run"

    # ------------------------------------------------------------------ decisions
    def choice(self, now: float) -> dict:
        """The interval and why (the `checkpoint_interval` event, the summary's block)."""
        save_s = self.save_s()
        mtbf_s, source = self.mtbf(now)
        return {"interval_s": round(young_interval(max(save_s, 1e-3), mtbf_s), 2), "save_s": round(save_s, 4),
                "save_from": f"median of {len(self._saves)} save(s)" if self._saves else "assumed (none measured yet)",
                "mtbf_s": round(mtbf_s, 1), "mtbf_from": source, "failures": self.history.failures,
                "rule": "young: sqrt(2 x save_s x mtbf_s)"}

    def due(self, now: float) -> bool:
        if not self._saves:  # nothing measured yet: a first save measures C
            return True
        return now - self._last_save_t >= self.choice(now)["interval_s"]

    def changed(self, now: float) -> dict | None:
        """The choice when it is new or moved more than RELOG_CHANGE since last logged."""
        c = self.choice(now)
        if self._logged_s is not None and abs(c["interval_s"] - self._logged_s) <= RELOG_CHANGE * self._logged_s:
            return None
        self._logged_s = c["interval_s"]
        return c
