"""What the goodput ledger must show on a real run with an injected fault (issue 26):
the parts add up to the wall time within 1%; `recomputed` is the re-run steps' time;
`detection` the time from the fault until the run knew (a hang verdict or the Train
controller's group_failed). Shared by the fault tests that already make such runs."""
from __future__ import annotations

import statistics
from pathlib import Path

from raygpt.train.metrics import read_metrics


def check_ledger(run_dir: Path, summary: dict, chaos, known_by: str) -> dict:
    """known_by: the metrics.jsonl event that says the run knew (`hang`, `group_failed`)."""
    g = summary["goodput"]
    parts = g["productive_s"] + sum(g["categories"].values())
    assert abs(parts - g["wall_s"]) <= 0.01 * g["wall_s"], g
    run_s = next(e["t"] for e in chaos.timeline.events if e["event"] == "run finished")
    assert abs(g["wall_s"] - run_s) <= 0.05 * run_s + 2, (g["wall_s"], run_s)  # the launch, Ray start in
    recs = read_metrics(run_dir)
    step_s = statistics.median(r["step_ms"] / 1000 for r in recs if "step_ms" in r and "first_step_ms" not in r)
    # re-run steps: the furthest step before the fault minus the step restored
    (rec,) = chaos.recoveries()
    want = rec["steps_lost"] * step_s
    assert rec["steps_lost"] >= 1 and 0.5 * want <= g["categories"]["recomputed"] <= 2 * want + step_s, (g, want)
    # detection: from the fault (chaos's injection time) to the first mark, within a step
    # either way (the last record before the fault may trail it, or lead it by a step)
    injected = next(e for e in chaos.timeline.events if e["event"].startswith("failure injected"))
    t_fault = chaos.timeline.t0 + injected["t"]
    t_known = min(r["time"] for r in recs if r.get("event") == known_by and r["time"] >= t_fault)
    seen = t_known - t_fault
    assert seen - step_s - 1.5 <= g["categories"]["detection"] <= seen + step_s + 1.5, (g, seen)
    assert g["categories"]["restart"] > 0 and g["categories"]["checkpoint_restore"] > 0, g
    print(f"ledger: {g}; fault seen after {seen:.1f} s; {rec['steps_lost']} steps re-run x {step_s:.3f} s")
    return g
