"""Goodput soak: faults on a schedule against real training, fixed intervals vs `auto`.

Each configuration (a checkpoint interval: `auto` or a step count) trains for --minutes
on its own local cluster (a head and 2 worker nodes of 1 CPU, elastic 1:2 workers,
raygpt.train.chaos) while one fault per --every minutes hits it, in the middle of each
period, cycling: worker SIGKILL, worker SIGSTOP (freeze), node loss, preemption drain
(30 s notice); a lost or drained node is replaced, as a cloud would. The run ends at
run.time_limit_s (a checkpoint, then the end). Afterwards, per configuration: the goodput
ledger (raygpt.train.goodput) and the scale model's prediction
(raygpt.train.goodput_model) from that run's own measured save cost, restart cost, save
interval and fault rate, with the start-up/eval/data/other shares the model leaves out
taken from the ledger.

    python bench/goodput.py                                    # 30 min each, a fault / 5 min
    python bench/goodput.py --minutes 4 --every 2 --intervals auto --parallel 1   # a look
    python bench/goodput.py --minutes 20 --every 2 --intervals auto --modes restart,replica
    python bench/goodput.py --modes replica --log-every 5        # replica mode, 4 intervals (62 min)

--modes: run.fault_tolerance of each configuration. `restart` runs elastic 1:2 workers
(the whole group restarts from a checkpoint, on what is left); `replica` runs 2 fixed
workers, each a torchft replica (the other steps on, a replacement heals from it). Their
runs are named soak-<interval> and soak-replica-<interval>.

--parallel runs that many configurations at once (each on its own cluster; on a 2-core
machine 2 at a time roughly doubles step and restart times for both). Writes
<out>/soak.json and each run's goodput.png (`raygpt report`); prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL = ["model.n_layer=4", "model.n_embd=128", "model.block_size=64", "train.global_batch=16",
         "train.micro_batch=8", "train.eval_every=100000", "train.max_steps=10000000"]


REPLICAS = 2  # replica mode's workers, each its own replica


def one(config: str, minutes: float, every: float, out: Path, kinds: str | None = None, log_every: int = 1) -> None:
    """A child process: one configuration's soak on its own cluster."""
    import ray

    from raygpt.train.chaos import Timeline, chaos_env, local_cluster, run_with_chaos, soak_actions
    from raygpt.train.launch import init_ray
    from raygpt.train.metrics import write_json_atomic
    from raygpt.train.runconfig import build_run_config

    chaos_env()
    replica = config.startswith("replica-")
    interval = config.removeprefix("replica-")
    name = f"soak-{config}"
    mode = ["run.fault_tolerance=replica"] if replica else []
    cfg = build_run_config(None, "debug", [*MODEL, f"train.log_every={log_every}", f"checkpoint.every={interval}",
                                           "run.cpus_per_worker=1", f"run.time_limit_s={minutes * 60}",
                                           "run.elastic_resize_interval_s=5", *mode],
                           num_workers=str(REPLICAS) if replica else "1:2", storage=str(out), name=name, max_failures=-1,
                           resources='{"w": 1}')
    cluster = local_cluster(2)
    try:
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        timeline = Timeline()
        timeline.add("cluster up", nodes=3, interval=interval)
        actions = soak_actions(minutes, every, **({"kinds": tuple(kinds.split(","))} if kinds else {}))
        summary, chaos, err = run_with_chaos(cfg, actions, cluster=cluster, timeline=timeline)
    finally:
        ray.shutdown()
        cluster.shutdown()
    write_json_atomic(out / name / "timeline.json", {"events": chaos.timeline.events, "summary": summary,
                                                     "error": None if err is None else f"{type(err).__name__}: {err}"})


def analyse(run_dir: Path, every_min: float) -> dict:
    """The ledger of one soak run and the scale model's figure from its own measurements."""
    from raygpt.train.goodput import ledger
    from raygpt.train.goodput_model import predict, predict_replica
    from raygpt.train.metrics import read_metrics
    from raygpt.train.report import plot_goodput

    recs = read_metrics(run_dir)
    led = ledger(recs)
    events = json.loads((run_dir / "timeline.json").read_text())["events"]
    faults = [e for e in events if e["event"].startswith("failure injected") or e["event"].startswith("preemption notice")]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    save_s = statistics.median([float(r.get("blocked_s") or 0) for r in saves]) if saves else 0.0
    gaps = [b["time"] - a["time"] for a, b in zip(saves, saves[1:]) if 0 < b["time"] - a["time"]]
    tau = statistics.median(gaps) if gaps else led.wall_s
    sec, wall, n = led.seconds, led.wall_s, max(1, len(faults))
    restart_s = (sec["detection"] + sec["restart"] + sec["checkpoint_restore"]) / n
    mtbf_s = wall / n
    if run_dir.name.startswith("soak-replica-"):  # 2 replicas: replica_out is half the time one was out
        model = predict_replica(REPLICAS, mtbf_s, save_s, restart_s, REPLICAS * sec["replica_out"] / n,
                                gpus_per_replica=1, gpus_per_node=REPLICAS, interval_s=tau)
    else:
        model = predict(1, mtbf_s, save_s, restart_s, gpus_per_node=1, interval_s=tau)
    outside = sum(sec[c] for c in ("startup", "compile", "eval", "data", "other")) / wall  # not in the model
    png = plot_goodput(run_dir, recs, led)
    choices = [r for r in recs if r.get("event") == "checkpoint_interval"]
    return {"run_dir": str(run_dir), "goodput": round(led.goodput, 4), "wall_s": round(wall, 1),
            "faults": [e["event"] for e in faults], "fault_every_min": every_min, "saves": len(saves),
            "save_s": round(save_s, 4), "interval_s": round(tau, 2), "restart_s": round(restart_s, 2),
            "mtbf_s": round(mtbf_s, 1), "model_steady": round(model.goodput, 4),
            "model": round(model.goodput - outside, 4), "outside_model": round(outside, 4),
            "categories": {c: round(v / wall, 4) for c, v in sec.items()}, "failures": led.failures,
            "auto_choices": [{k: c[k] for k in ("step", "interval_s", "save_s", "mtbf_s", "mtbf_from")} for c in choices],
            "goodput_png": str(png)}


def print_table(rows: list[dict]) -> None:
    cats = ("checkpoint_save", "recomputed", "detection", "restart", "replica_out", "startup", "other")
    print(f"{'config':>14} {'goodput':>8} {'model':>6} {'faults':>6} {'saves':>5} {'every s':>8} {'save s':>7} "
          f"{'R s':>6} " + " ".join(f"{c[:10]:>10}" for c in cats))
    for r in rows:
        print(f"{r['config']:>14} {r['goodput']:>8.1%} {r['model']:>6.1%} {len(r['faults']):>6} {r['saves']:>5} "
              f"{r['interval_s']:>8.1f} {r['save_s']:>7.3f} {r['restart_s']:>6.1f} "
              + " ".join(f"{r['categories'][c]:>10.1%}" for c in cats))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="length of each configuration's run")
    ap.add_argument("--every", type=float, default=5.0, help="minutes between faults")
    ap.add_argument("--intervals", default="auto,20,100,1000", help="checkpoint.every values, comma-separated")
    ap.add_argument("--modes", default="restart", help="run.fault_tolerance values, comma-separated")
    ap.add_argument("--kinds", default=None, help="fault kinds to cycle (default: kill, freeze, node loss, drain)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="train.log_every: a metrics line (rank 0's JSON, console) every N steps")
    ap.add_argument("--parallel", type=int, default=2, help="configurations run at once")
    ap.add_argument("--out", default="/tmp/raygpt-goodput-soak")
    ap.add_argument("--reuse", action="store_true",
                    help="configurations whose run already has a timeline.json are analysed, not run again")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    if a.one:
        return one(a.one, a.minutes, a.every, out, a.kinds, a.log_every)
    out.mkdir(parents=True, exist_ok=True)
    configs = [iv if m == "restart" else f"{m}-{iv}" for m in a.modes.split(",") for iv in a.intervals.split(",")]
    todo, running, t0 = list(configs), [], time.time()
    if a.reuse:
        todo = [iv for iv in todo if not (out / f"soak-{iv}" / "timeline.json").is_file()]
    print(f"soak: {len(todo)} configuration(s) x {a.minutes:g} min, a fault every {a.every:g} min, "
          f"{a.parallel} at a time -> {out}", flush=True)
    while todo or running:
        while todo and len(running) < a.parallel:
            iv = todo.pop(0)
            log = open(out / f"soak-{iv}.log", "w")
            kinds = ["--kinds", a.kinds] if a.kinds else []
            kinds += ["--log-every", str(a.log_every)]
            running.append((iv, subprocess.Popen([sys.executable, __file__, "--one", iv, "--minutes", str(a.minutes),
                                                  "--every", str(a.every), "--out", str(out), *kinds],
                                                 stdout=log, stderr=subprocess.STDOUT)))
            print(f"  +{time.time() - t0:6.0f}s started checkpoint.every={iv} (log {log.name})", flush=True)
        time.sleep(5)
        for iv, p in [x for x in running if x[1].poll() is not None]:
            running.remove((iv, p))
            print(f"  +{time.time() - t0:6.0f}s checkpoint.every={iv} done (exit {p.returncode})", flush=True)
    rows = []
    for iv in configs:
        run_dir = out / f"soak-{iv}"
        if not (run_dir / "timeline.json").is_file():
            print(f"checkpoint.every={iv}: no timeline (see {out / f'soak-{iv}.log'})")
            continue
        rows.append({"config": iv, **analyse(run_dir, a.every)})
    (out / "soak.json").write_text(json.dumps({"minutes": a.minutes, "every_min": a.every, "parallel": a.parallel,
                                               "rows": rows}, indent=1))
    print_table(rows)
    print(f"details: {out / 'soak.json'}")


if __name__ == "__main__":
    main()
