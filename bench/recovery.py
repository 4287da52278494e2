"""Recovery from a killed worker, and time blocked in checkpoint saves.

    python bench/recovery.py [--workers 2] [--steps 60] [--kill-at 25] [--every 10]

Runs a 2-worker DDP job on an embedded Ray, SIGKILLs one worker at the chosen step, and
prints: time from the kill to the failure being detected, to the restarted worker group,
to the first step after the restore; the steps lost; and the fraction of step time spent
blocked in checkpoint saves (from metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-at", type=int, default=25)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    import ray

    from raygpt.config import load_config
    from raygpt.train.chaos import Action, run_with_chaos
    from raygpt.train.metrics import read_metrics

    storage = tempfile.mkdtemp(prefix="raygpt-recovery-")
    cfg = load_config(args.preset, overrides=[
        f"run.storage={storage}", "run.name=recovery", f"run.num_workers={args.workers}", "run.cpus_per_worker=1",
        "run.max_failures=3", "train.log_every=1", f"train.max_steps={args.steps}",
        f"checkpoint.every={args.every}", "model.n_embd=64", "model.block_size=64", "train.global_batch=16",
        "train.micro_batch=8", *args.set])
    ray.init(num_cpus=max(4, args.workers * 2))
    try:
        summary, chaos, err = run_with_chaos(cfg, [Action("kill-worker", args.kill_at, rank=1)])
    finally:
        ray.shutdown()
    if err:
        raise err
    recs = read_metrics(summary["run_dir"])
    ev = chaos.timeline.events
    kill = next(e for e in ev if e["event"].startswith("failure injected"))
    detected = next((e for e in ev if e["event"].startswith("failure detected")), None)
    restart = next((e for e in ev if e["event"] == "worker group restarted"), None)
    first = next((e for e in ev if e["event"] == "first step after restore"), None)
    step_ms = [r["step_ms"] for r in recs if "step_ms" in r]
    blocked = sum(r["blocked_s"] for r in recs if r.get("event") == "checkpoint")
    train_s = summary["train_seconds"]
    out = {
        "kill_at_step": kill["step"],
        "detected_after_s": detected and detected["after_s"],
        "restarted_after_s": restart and round(restart["t"] - kill["t"], 2),
        "first_step_after_s": first and first["recovery_s"],
        "steps_lost": first and first["steps_lost"],
        "median_step_ms": sorted(step_ms)[len(step_ms) // 2] if step_ms else None,
        "checkpoint_blocked_s": round(blocked, 3),
        "checkpoint_blocked_fraction": round(blocked / max(train_s + blocked, 1e-9), 4),
        "checkpoints": sum(1 for r in recs if r.get("event") == "checkpoint"),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
