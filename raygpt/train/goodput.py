"""The goodput ledger: where a run's wall time went, from its metrics.jsonl alone.

Wall time is the sum of the run's launches (each `raygpt train` / resume of the same run
name: from the driver's start of `run_training` to its end; the `launch` and
`launch_end` events). Each launch is cut into intervals that do not overlap, and each
interval's seconds go to exactly one category, so the parts add up to the wall time:

- before the first worker group's training function begins: `startup`;
- a group's own start (its `start` event carries the split): data preparation ->
  `data`, checkpoint restore -> `checkpoint_restore`, the rest (model build, process
  group, joining the heartbeat) -> `startup` for the launch's first group, `restart`
  for a later one;
- between a group's `start` and its last record: step time (the `train_seconds` deltas
  of its step records) split into `compile` (the first step's excess over a normal
  step), `recomputed` (steps whose number the run had already reached before), `data`
  (the slowest rank's batch reading per step) and `productive`; plus
  `eval` (`eval_s` of eval records), `checkpoint_save` (`blocked_s` of `checkpoint`
  events) and `other` (the remainder: logging, the per-step agreement's tail, waits);
- after a group that failed (no `end` event): `detection` from its last record until
  the run knew (the driver's `hang` verdict or the Train controller's `group_failed`,
  whichever is first), then `restart` until the next group's training function begins;
  after a group that ended itself (a preemption move, a SIGTERM stop) or that an
  elastic resize ended (the controller's `resize` event): `restart`;
- after the launch's last group: `other` (or `detection` first, as above);
- run.fault_tolerance=replica (the group never restarts): a step window whose record
  says `replicas` of `world_size` were in the quorum counts that share of its productive
  time as productive and the rest as `replica_out` (a replica missing, the others
  stepping); `stall_s` (steps the quorum could not commit after a peer was lost, until
  it re-formed without it) is `detection`.

Pure functions over records (dicts); nothing here starts Ray or reads a clock.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

CATEGORIES = ("productive", "startup", "data", "compile", "checkpoint_save", "checkpoint_restore",
              "recomputed", "detection", "restart", "replica_out", "eval", "other")
BADPUT = CATEGORIES[1:]
FAILURE_MARKS = ("hang", "group_failed")  # driver-side events: the run knew a group failed
PLANNED_MARKS = ("resize",)  # the Train controller ended a healthy group (an elastic resize)
DRIVER_EVENTS = ("launch", "launch_end", *FAILURE_MARKS, *PLANNED_MARKS)


@dataclass
class Ledger:
    seconds: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    launches: list = field(default_factory=list)  # [(start, end)] epoch seconds
    failures: int = 0  # groups that ended without an `end` event, then restarted or not

    @property
    def wall_s(self) -> float:
        return sum(e - s for s, e in self.launches)

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.wall_s if self.wall_s > 0 else 0.0

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += max(0.0, seconds)

    def to_dict(self) -> dict:
        """summary.json's `goodput` block."""
        return {"wall_s": round(self.wall_s, 3), "productive_s": round(self.seconds["productive"], 3),
                "goodput": round(self.goodput, 4),
                "categories": {c: round(self.seconds[c], 3) for c in BADPUT},
                "launches": len(self.launches), "failures": self.failures}


def split_launches(records: list[dict]) -> list[list[dict]]:
    """Records per launch (file order). Records before any `launch` event (a run from
    before the ledger) form one launch of their own."""
    out: list[list[dict]] = []
    for r in records:
        if r.get("event") == "launch" or not out:
            out.append([])
        out[-1].append(r)
    return [recs for recs in out if recs]


def split_groups(recs: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(records before the first `start`, then one list per worker group starting with
    its `start` event)."""
    head, groups = [], []
    for r in recs:
        if r.get("event") == "start":
            groups.append([r])
        elif groups:
            groups[-1].append(r)
        else:
            head.append(r)
    return head, groups


def is_step(r: dict) -> bool:
    return "step" in r and "event" not in r and "train_seconds" in r


class _Group:
    """One worker group's records: its start, its step records, where it ended."""

    def __init__(self, recs: list[dict]):
        self.start = recs[0]
        self.steps = [r for r in recs[1:] if is_step(r)]
        own = [r for r in recs if r.get("event") not in DRIVER_EVENTS]
        self.last_t = max(r["time"] for r in own)
        # Planned ends, no failure: the group ended itself (`end`), committed its move off
        # a draining node (the other ranks' exit can tear rank 0 down before it writes
        # `end`; the controller then says `planned`), or a resize ended it (decided while
        # it still stepped: the teardown follows).
        self.ended = any(r.get("event") in ("end", "preemption_checkpoint") for r in own) or any(
            r.get("event") in PLANNED_MARKS or (r.get("event") == "group_failed" and r.get("planned")) for r in recs)
        self.marks = sorted(r["time"] for r in recs if r.get("event") in FAILURE_MARKS and r["time"] >= self.last_t)
        self.saves = sum(float(r.get("blocked_s") or 0) for r in own if r.get("event") == "checkpoint")
        self.evals = sum(float(r.get("eval_s") or 0) for r in self.steps)

    def t0(self, floor: float) -> float:
        """When its training function began (the `start` event's `t0`), within bounds."""
        return min(max(float(self.start.get("t0", self.start["time"])), floor), self.start["time"])

    def windows(self) -> list[tuple[float, int, int, dict]]:
        """(step seconds, first step, last step, the record closing it) between records."""
        ts_prev = self.start.get("train_seconds")
        if ts_prev is None and self.steps:  # a start event from before the ledger
            ts_prev = self.steps[0]["train_seconds"]
        prev_step, out = self.start["step"], []
        for r in self.steps:
            out.append((max(0.0, r["train_seconds"] - ts_prev), prev_step, r["step"], r))
            ts_prev, prev_step = r["train_seconds"], r["step"]
        return out


def _data_per_step(windows) -> list[float]:
    """Per window, the seconds a step waited on its batch (the slowest rank's reading, a
    mean over its log window): from the window's own record or, when it has none (a
    checkpoint-only record), the next one that has."""
    out, nxt = [0.0] * len(windows), 0.0
    for i in range(len(windows) - 1, -1, -1):
        r = windows[i][3]
        if r.get("rank_data_ms"):
            nxt = max(r["rank_data_ms"]) / 1000
        out[i] = nxt
    return out


class LedgerBuilder:
    """Walks a run's records launch by launch, group by group (named steps below)."""

    def __init__(self, records: list[dict], now: float | None = None):
        self.records = [r for r in records if isinstance(r.get("time"), (int, float))]
        self.now = now  # end of a launch still open (the driver computes before it ends)
        self.ledger = Ledger()
        self.reached = -1  # the furthest step the run has logged so far

    def build(self) -> Ledger:
        for recs in split_launches(self.records):
            self._launch(recs)
        return self.ledger

    def _launch(self, recs: list[dict]) -> None:
        first = recs[0]
        start = float(first.get("started", first["time"])) if first.get("event") == "launch" else first["time"]
        ends = [r["time"] for r in recs if r.get("event") == "launch_end"]
        end = ends[-1] if ends else (self.now if self.now is not None else max(r["time"] for r in recs))
        end = max(end, start)
        self.ledger.launches.append((start, end))
        _, group_recs = split_groups(recs)
        groups = [_Group(g) for g in group_recs]
        cursor, prev = start, None
        for i, g in enumerate(groups):
            t0 = g.t0(cursor)
            if prev is not None:
                self._after_group(prev, cursor, t0, "restart")
            else:
                self.ledger.add("startup", t0 - cursor)
            self._group_start(g, t0, "startup" if i == 0 else "restart")
            self._group_body(g)
            cursor, prev = max(g.last_t, g.start["time"]), g
        if prev is None:
            self.ledger.add("startup", end - start)
        else:
            self._after_group(prev, cursor, max(end, cursor), "other")

    def _after_group(self, g: _Group, since: float, until: float, then: str) -> None:
        """A failed group: detection until the first failure mark, then `then`."""
        if g.ended:
            self.ledger.add(then, until - since)
            return
        self.ledger.failures += 1
        known = next((t for t in g.marks if t <= until), None)
        if known is None:
            self.ledger.add(then, until - since)
            return
        self.ledger.add("detection", known - since)
        self.ledger.add(then, until - known)

    def _group_start(self, g: _Group, t0: float, rest: str) -> None:
        span = g.start["time"] - t0
        parts = {"data": float(g.start.get("prepare_s") or 0), "checkpoint_restore": float(g.start.get("restore_s") or 0)}
        scale = min(1.0, span / sum(parts.values())) if sum(parts.values()) > 0 else 1.0
        for k, v in parts.items():
            self.ledger.add(k, v * scale)
        self.ledger.add(rest, span - scale * sum(parts.values()))

    def _group_body(self, g: _Group) -> None:
        span = max(0.0, g.last_t - g.start["time"])
        windows = g.windows()
        split = self._split_steps(g, windows)
        split["eval"], split["checkpoint_save"] = g.evals, g.saves
        total = sum(split.values())
        scale = min(1.0, span / total) if total > 0 else 1.0  # clock noise: never exceed the span
        for k, v in split.items():
            self.ledger.add(k, v * scale)
        self.ledger.add("other", span - scale * total)
        if g.steps:
            self.reached = max(self.reached, max(r["step"] for r in g.steps))

    def _split_steps(self, g: _Group, windows) -> dict:
        out = dict.fromkeys(("productive", "data", "compile", "recomputed", "detection", "replica_out"), 0.0)
        if not windows:
            return out
        per_step = [dt / (b - a) for dt, a, b, _ in windows[1:] if b > a]
        typical = statistics.median(per_step) if per_step else 0.0
        first = g.steps[0].get("first_step_ms")
        compile_s = min(windows[0][0], max(0.0, first / 1000 - typical)) if first is not None and per_step else 0.0
        out["compile"] = compile_s
        for i, (dt, a, b, r), data_s in zip(range(len(windows)), windows, _data_per_step(windows)):
            dt -= compile_s if i == 0 else 0.0
            out["detection"] += float(r.get("stall_s") or 0.0)  # not in train_seconds: the steps it redid
            redo = max(0, min(b, self.reached) - a) / (b - a) if b > a else 0.0
            out["recomputed"] += dt * redo  # a re-run step counts whole, its batch wait too
            data = min(dt * (1 - redo), data_s * (b - a) * (1 - redo))
            out["data"] += data
            share = _replica_share(r)
            out["productive"] += (dt * (1 - redo) - data) * share
            out["replica_out"] += (dt * (1 - redo) - data) * (1 - share)
        return out


def _replica_share(r: dict) -> float:
    """The share of the run's replicas in the quorum of a step window (1 outside replica mode)."""
    n, world = r.get("replicas"), r.get("world_size")
    return min(1.0, n / world) if n is not None and world else 1.0


def ledger(records: list[dict], now: float | None = None) -> Ledger:
    """The ledger of a run's metrics.jsonl records (all launches). `now`: the end of a
    launch that has no `launch_end` yet (else its last record)."""
    return LedgerBuilder(records, now).build()
