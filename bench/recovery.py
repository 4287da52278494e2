"""Recovery figures.

    python bench/recovery.py [--workers 2] [--steps 60] [--kill-at 25] [--every 10]
    python bench/recovery.py --elastic [--steps 60]

Default: a 2-worker DDP job on an embedded Ray; one worker SIGKILLed at the chosen step;
prints the time from the kill to the failure being detected, to the restarted worker
group, to the first step after the restore; the steps lost; and the fraction of step
time spent blocked in checkpoint saves (from metrics.jsonl).

--elastic: runs `raygpt chaos --num-workers 1:2 --nodes 2 --kill-worker-at 15
--remove-node-at 30 --add-node-at 45` (a local 3-raylet cluster), then a clean run of
the same config on one worker, and prints: recovery after the kill and after the node
loss (injection to the first step after the restore, detection included), when the
group grew back, the largest per-step loss difference from the clean run, and whether
summary.json is complete.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def kill_worker(args):
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
    return {
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


def _losses(run_dir: Path) -> dict[int, float]:
    from raygpt.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}  # the last run of each step


def elastic(args):
    out = Path(tempfile.mkdtemp(prefix="raygpt-elastic-"))
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    cli = [sys.executable, "-m", "raygpt.cli"]
    sets = [f"--set={s}" for s in args.set]
    chaos = subprocess.run([*cli, "chaos", "--num-workers", "1:2", "--nodes", "2", "--steps", str(args.steps),
                            "--kill-worker-at", "15", "--remove-node-at", "30", "--add-node-at", "45",
                            "--out", str(out / "chaos"), *sets], env=env, capture_output=True, text=True)
    if chaos.returncode:
        sys.exit(chaos.stdout[-3000:] + chaos.stderr[-3000:])
    (run_dir,) = (out / "chaos").iterdir()
    clean = subprocess.run([*cli, "train", "--preset", "debug", "--num-workers", "1", "--storage", str(out),
                            "--name", "clean", "--set", "train.log_every=1", "--set", f"train.max_steps={args.steps}",
                            "--set", "run.cpus_per_worker=1", *sets], env=env, capture_output=True, text=True)
    if clean.returncode:
        sys.exit(clean.stdout[-3000:] + clean.stderr[-3000:])
    ev = json.loads((run_dir / "timeline.json").read_text())["events"]
    rec = [e for e in ev if e["event"] == "first step after restore"]
    injected = [e for e in ev if e["event"].startswith("failure injected")]
    grown = [e for e in ev if e["event"] == "worker group restarted" and e["world_size"] == 2]
    a, b = _losses(run_dir), _losses(out / "clean")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "recoveries": [{"failure": i["event"], "at_step": i["step"], "first_step_after_s": r["recovery_s"],
                        "steps_lost": r["steps_lost"]} for i, r in zip(injected, rec)],
        "grew_back": [{"restored_step": g["restored_step"], "t_s": g["t"]} for g in grown],
        "steps": summary.get("steps"),
        "max_loss_diff_vs_clean": max(abs(a[s] - b[s]) for s in b) if a.keys() == b.keys() else "steps differ",
        "summary_complete": all(summary.get(k) is not None for k in
                                ("final_val_loss", "best_val_loss", "tokens_per_s", "mfu", "train_seconds")),
        "run_dir": str(run_dir),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-at", type=int, default=25)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--elastic", action="store_true", help="the node-loss / grow-back scenario (raygpt chaos)")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    print(json.dumps(elastic(args) if args.elastic else kill_worker(args), indent=1))


if __name__ == "__main__":
    main()
