"""Ray 2.60's TorchftConfig (experimental): replace only the failed replica group.

    python bench/ray_torchft.py [--workers 3] [--steps 150] [--at 30] [--fault kill|stop]
                                [--report-every 0]

A TorchTrainer with TorchftConfig on a local Ray (ray.init(num_cpus=workers+1)), one
worker per replica group, gloo on CPU, each training the same tiny raygpt GPT through
torchft's Manager/DistributedDataParallel/Optimizer (the shape of Ray's
ray/train/v2/examples/pytorch/torchft_linear_example.py). Every worker writes a JSON
line per step; the driver SIGKILLs (or SIGSTOPs, then SIGKILLs once the survivors
stepped without it, as a hang watchdog would) the last rank's process at step --at and
prints: whether only that replica group was replaced (the survivors' pids unchanged),
the survivors' longest gap between committed steps, how long until the replacement
commits a step, and whether it healed from a peer.
--report-every N: ray.train.report(metrics) every N steps (a barrier across all workers
in Train V2) to see what it does to the survivors while a replica is missing (with N=2
the survivors block in the report, the replacement times out in torchft's quorum and the
run fails: docs/replica_recovery.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchft_replicas import read  # noqa: E402  (bench/ beside this file)


def train_func(config):
    import torch
    from torchft import ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    import ray.train
    from torchft_replicas import build_replica

    t_start = time.time()
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    wr = ctx.get_world_rank()
    log = open(Path(config["logdir"]) / f"w{wr}-{os.getpid()}.jsonl", "a", buffering=1)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=config["timeout"]))
    transport = PGTransport(pg, timeout=timedelta(seconds=config["timeout"]), device=torch.device("cpu"))
    model, manager, ddp, optim, healed = build_replica(pg, transport, config["timeout"], f"train_ddp_{wr}")
    import torch.distributed as dist

    log.write(json.dumps({"event": "start", "rank": wr, "pid": os.getpid(), "t": t_start, "ready": time.time(),
                          "ray_world_size": ctx.get_world_size(),
                          "torch_dist_world_size": dist.get_world_size() if dist.is_initialized() else None,
                          "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT",
                                                                   "TORCHFT_LIGHTHOUSE")}}) + "\n")
    while manager.current_step() < config["steps"]:
        t0 = time.time()
        step = manager.current_step()
        optim.zero_grad()
        g = torch.Generator().manual_seed(step * 1000 + wr)
        x = torch.randint(0, 65, (8, 32), generator=g)
        _, loss = ddp(x, x.roll(-1, 1))
        loss.backward()
        optim.step()
        with torch.no_grad():
            csum = float(sum(p.double().sum() for p in model.parameters()))
        log.write(json.dumps({"t": time.time(), "dt": time.time() - t0, "step_before": step,
                              "step": manager.current_step(), "committed": manager.current_step() > step,
                              "n": manager.num_participants(), "healed": healed["n"], "loss": loss.item(),
                              "csum": csum}) + "\n")
        if config["report_every"] and manager.current_step() % config["report_every"] == 0:
            ray.train.report({"step": manager.current_step(), "loss": loss.item()})
        if config["step_sleep"]:
            time.sleep(config["step_sleep"])
    log.write(json.dumps({"event": "done", "t": time.time(), "step": manager.current_step()}) + "\n")
    manager.shutdown()


def logs_by_rank(logdir):
    by = {}
    for p in sorted(Path(logdir).glob("w*.jsonl")):
        rank = int(p.name[1:].split("-")[0])
        by.setdefault(rank, []).append(p)
    return by


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--at", type=int, default=30)
    ap.add_argument("--after", type=int, default=5)
    ap.add_argument("--fault", choices=["kill", "stop", "none"], default="kill")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--report-every", type=int, default=0)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=5000)
    ap.add_argument("--join-timeout-ms", type=int, default=60000)
    ap.add_argument("--max-wall", type=float, default=400)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.torch.torchft_config import TorchftConfig

    tmp = Path(tempfile.mkdtemp(prefix="raytft-"))
    logdir = tmp / "logs"
    logdir.mkdir()
    print(f"logs in {logdir}", flush=True)
    t0 = time.time()
    ray.init(num_cpus=args.workers + 1, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        train_loop_config={"logdir": str(logdir), "steps": args.steps, "timeout": args.timeout,
                           "report_every": args.report_every, "step_sleep": args.step_sleep},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
        torch_config=TorchftConfig(lighthouse_kwargs={
            "min_replicas": 1, "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
            "join_timeout_ms": args.join_timeout_ms}, backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp / "storage"), name="tft",
                             failure_config=FailureConfig(max_failures=3)),
    )
    out = {}

    def fit():
        try:
            out["result"] = trainer.fit()
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {e}"[:2000]

    th = threading.Thread(target=fit, daemon=True)
    th.start()
    victim = args.workers - 1
    t_fault = None
    deadline = time.time() + args.max_wall
    try:
        while args.fault != "none" and time.time() < deadline and th.is_alive():
            by = logs_by_rank(logdir)
            recs = [x for p in by.get(victim, []) for x in read(p) if x.get("committed")]
            if recs and recs[-1]["step"] >= args.at:
                vpid = next(x["pid"] for p in by[victim] for x in read(p) if x.get("event") == "start")
                t_fault = time.time()
                os.kill(vpid, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
                print(f"{args.fault} rank {victim} pid {vpid} at step {recs[-1]['step']}", flush=True)
                break
            time.sleep(0.05)
        if args.fault == "stop" and t_fault:
            while time.time() < deadline:
                s0 = [x for p in logs_by_rank(logdir)[0] for x in read(p)
                      if x.get("committed") and x["t"] > t_fault and x["n"] < args.workers]
                if len(s0) >= args.after:
                    break
                time.sleep(0.05)
            os.kill(vpid, signal.SIGKILL)
            print(f"SIGKILL the frozen pid {vpid} after {time.time() - t_fault:.1f} s", flush=True)
        th.join(max(1, deadline - time.time()))
    finally:
        if th.is_alive():
            print("timed out: shutting Ray down", flush=True)
        ray.shutdown()
    res = {"fault": args.fault, "workers": args.workers, "report_every": args.report_every,
           "wall_s": round(time.time() - t0, 1), "fit_error": out.get("error")}
    by = logs_by_rank(logdir)
    res["processes_per_rank"] = {r: len(ps) for r, ps in by.items()}
    if t_fault:
        s0 = [x for p in by[0] for x in read(p) if "committed" in x]
        pre = [x for x in s0 if x["committed"] and x["t"] < t_fault]
        post = [x for x in s0 if x["t"] >= t_fault]
        dts = sorted(x["dt"] for x in pre[-20:])
        res["survivor_step_s_median_before"] = round(dts[len(dts) // 2], 3) if dts else None
        commits = [pre[-1]["t"] if pre else t_fault] + [x["t"] for x in post if x["committed"]]
        res["survivor_longest_gap_s"] = round(max(b - a for a, b in zip(commits, commits[1:])), 2) if len(commits) > 1 else None
        fc = next((x for x in post if x["committed"]), None)
        res["survivor_first_commit_after_fault_s"] = round(fc["t"] - t_fault, 2) if fc else None
        res["survivor_failed_steps"] = sum(1 for x in post if not x["committed"])
        new = [p for p in by.get(victim, []) if any(x.get("event") == "start" and x["t"] > t_fault for x in read(p))]
        if new:
            nrecs = read(new[0])
            st = next(x for x in nrecs if x.get("event") == "start")
            fcn = next((x for x in nrecs if x.get("committed")), None)
            res["replacement_train_func_start_after_fault_s"] = round(st["t"] - t_fault, 2)
            res["replacement_manager_ready_after_fault_s"] = round(st["ready"] - t_fault, 2)
            res["replacement_first_commit_after_fault_s"] = round(fcn["t"] - t_fault, 2) if fcn else None
            res["replacement_first_step"] = fcn["step"] if fcn else None
            res["replacement_healed_from_peer"] = bool(fcn and fcn["healed"])
            full = [x for x in post if x["n"] == args.workers and x["t"] > st["t"]]
            res["survivors_full_quorum_after_fault_s"] = round(full[0]["t"] - t_fault, 2) if full else None
        res["survivor_pids_unchanged"] = all(len(by[r]) == 1 for r in by if r != victim)
    finals = {}
    for r, ps in by.items():
        recs = [x for x in read(ps[-1]) if "csum" in x]
        if recs:
            finals[r] = (recs[-1]["step"], recs[-1]["csum"])
    res["final_step_csum"] = finals
    res["same_final_weights"] = len(set(finals.values())) == 1
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
