"""Replica-level fault tolerance with torchft, without Ray: figures for issue 30.

    python bench/torchft_replicas.py [--replicas 3] [--steps 120] [--fault kill|stop] [--at 30]

Starts a torchft Lighthouse in this process and one process per replica group (1 worker
each, gloo, CPU), each training a tiny raygpt GPT through torchft's Manager,
DistributedDataParallel and Optimizer wrappers. When the last replica reaches step --at it
gets SIGKILL (--fault kill) or SIGSTOP (--fault stop: later SIGKILLed, once the survivors
stepped without it, as a hang watchdog would); then a replacement process with the same
replica id is started. Each replica writes one JSON line per step (time, manager step,
committed, participants, healed, parameter checksum). Printed: the survivors' longest gap
between committed steps after the fault, the replacement's start-to-first-commit time,
whether it healed from a peer (torchft's checkpoint transport, no file read), and whether
all replicas ended with the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path


def build_replica(pg, transport, timeout_s: float, replica_id: str, **manager_kw):
    """A tiny GPT and AdamW under torchft's Manager, DDP and Optimizer wrappers; a replica
    that falls behind heals its state from a live peer. -> (model, manager, ddp, optim, healed)."""
    import torch
    from torchft import DistributedDataParallel, Manager, Optimizer

    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(1234)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    healed = {"n": 0}

    def load_state_dict(sd):
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        healed["n"] += 1

    def state_dict():
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=load_state_dict, state_dict=state_dict,
                      rank=0, world_size=1, replica_id=replica_id, timeout=timedelta(seconds=timeout_s),
                      checkpoint_transport=transport, **manager_kw)
    return model, manager, DistributedDataParallel(manager, model), Optimizer(manager, opt), healed


def replica(args):
    import torch

    torch.set_num_threads(1)
    from torch.distributed import TCPStore
    from torchft import ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    t_start = time.time()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=args.pg_timeout))
    transport = PGTransport(pg, timeout=timedelta(seconds=args.timeout), device=torch.device("cpu"))
    model, manager, ddp, optim, healed = build_replica(
        pg, transport, args.timeout, f"replica_{args.rid}", store_addr="127.0.0.1", store_port=store.port,
        lighthouse_addr=args.lighthouse, quorum_timeout=timedelta(seconds=args.quorum_timeout))
    t_ready = time.time()
    log = open(args.log, "a", buffering=1)
    log.write(json.dumps({"event": "start", "pid": os.getpid(), "t": t_start, "ready": t_ready}) + "\n")
    while manager.current_step() < args.steps:
        t0 = time.time()
        step = manager.current_step()
        optim.zero_grad()  # starts this step's quorum (async)
        g = torch.Generator().manual_seed(step * 1000 + args.rid)
        x = torch.randint(0, 65, (8, 32), generator=g)
        _, loss = ddp(x, x.roll(-1, 1))
        loss.backward()
        optim.step()  # commits only if every participant's all-reduce went through
        with torch.no_grad():
            csum = float(sum(p.double().sum() for p in model.parameters()))
        log.write(json.dumps({
            "t": time.time(), "dt": time.time() - t0, "step_before": step, "step": manager.current_step(),
            "committed": manager.current_step() > step, "n": manager.num_participants(),
            "healed": healed["n"], "loss": loss.item(), "csum": csum}) + "\n")
        if args.step_sleep:
            time.sleep(args.step_sleep)
    log.write(json.dumps({"event": "done", "t": time.time(), "step": manager.current_step()}) + "\n")
    manager.shutdown(wait=False)


def read(path):
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def driver(args):
    from torchft.coordination import LighthouseServer

    tmp = Path(tempfile.mkdtemp(prefix="tft-"))
    lh = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=args.join_timeout_ms,
                          heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    addr = lh.address()
    print(f"lighthouse {addr}, logs in {tmp}", flush=True)
    procs = {}

    def start(rid, tag):
        logp = tmp / f"r{rid}{tag}.jsonl"
        cmd = [sys.executable, __file__, "replica", "--rid", str(rid), "--lighthouse", addr,
               "--steps", str(args.steps), "--log", str(logp), "--timeout", str(args.timeout),
               "--pg-timeout", str(args.pg_timeout), "--quorum-timeout", str(args.quorum_timeout),
               "--step-sleep", str(args.step_sleep)]
        err = open(tmp / f"r{rid}{tag}.stderr", "w")
        p = subprocess.Popen(cmd, stdout=err, stderr=err)
        procs[(rid, tag)] = p
        return p, logp, time.time()

    logs = {}
    for r in range(args.replicas):
        _, logs[r], _ = start(r, "")
    victim = args.replicas - 1
    t_fault = t_replace = None
    deadline = time.time() + args.max_wall
    try:
        # wait for the victim to reach --at
        while time.time() < deadline:
            recs = [x for x in read(logs[victim]) if x.get("committed")]
            if recs and recs[-1]["step"] >= args.at:
                break
            time.sleep(0.05)
        vp = procs[(victim, "")]
        t_fault = time.time()
        os.kill(vp.pid, signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
        print(f"{args.fault} replica {victim} (pid {vp.pid}) at step {args.at}", flush=True)
        # wait for a survivor to commit args.after steps without the victim
        while time.time() < deadline:
            recs = [x for x in read(logs[0]) if x.get("committed") and x["t"] > t_fault and x["n"] < args.replicas]
            if len(recs) >= args.after:
                break
            time.sleep(0.05)
        if args.fault == "stop":
            os.kill(vp.pid, signal.SIGKILL)  # what a hang watchdog would do
        vp.wait()
        _, logs["new"], t_replace = start(victim, "new")
        print(f"replacement started {t_replace - t_fault:.2f} s after the fault", flush=True)
        for (rid, tag), p in procs.items():
            if p.poll() is None:
                p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        print("timed out", flush=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        lh.shutdown()
    report(args, logs, t_fault, t_replace, victim)


def report(args, logs, t_fault, t_replace, victim):
    res = {"fault": args.fault, "replicas": args.replicas, "at": args.at}
    s0 = [x for x in read(logs[0]) if "step" in x and "event" not in x]
    pre = [x for x in s0 if x["committed"] and x["t"] < t_fault]
    post = [x for x in s0 if x["t"] >= t_fault]
    steptime = sorted(x["dt"] for x in pre[-20:])
    res["survivor_step_s_median_before"] = round(steptime[len(steptime) // 2], 3) if steptime else None
    first_commit = next((x for x in post if x["committed"]), None)
    res["survivor_first_commit_after_fault_s"] = round(first_commit["t"] - t_fault, 2) if first_commit else None
    res["survivor_failed_steps_after_fault"] = sum(1 for x in post if not x["committed"])
    last_pre = pre[-1]["t"] if pre else t_fault
    commits = [last_pre] + [x["t"] for x in post if x["committed"]]
    res["survivor_longest_gap_s"] = round(max(b - a for a, b in zip(commits, commits[1:])), 2) if len(commits) > 1 else None
    new = read(logs.get("new", "/nonexistent"))
    if new:
        st = next(x for x in new if x.get("event") == "start")
        steps = [x for x in new if "committed" in x]
        fc = next((x for x in steps if x["committed"]), None)
        res["replacement_init_s"] = round(st["ready"] - t_replace, 2)
        res["replacement_first_commit_s"] = round(fc["t"] - t_replace, 2) if fc else None
        res["replacement_first_step"] = fc["step"] if fc else None
        res["replacement_healed_from_peer"] = bool(fc and fc["healed"])
        res["survivor_step_when_replacement_committed"] = (
            max((x["step"] for x in s0 if x["committed"] and fc and x["t"] <= fc["t"]), default=None))
        join = [x for x in post if x["t"] > t_replace and x["n"] == args.replicas]
        res["survivors_see_full_quorum_after_s"] = round(join[0]["t"] - t_replace, 2) if join else None
    finals = {}
    for k, p in logs.items():
        if k == victim:
            continue
        recs = [x for x in read(p) if "csum" in x]
        if recs:
            finals[str(k)] = (recs[-1]["step"], recs[-1]["csum"])
    res["final_step_csum"] = finals
    res["same_final_weights"] = len({v for v in finals.values()}) == 1
    steps0 = [x["step"] for x in s0 if x["committed"]]
    res["survivor_steps_monotonic_no_repeat"] = steps0 == sorted(set(steps0))
    print(json.dumps(res, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="driver", choices=["driver", "replica"])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--at", type=int, default=30)
    ap.add_argument("--after", type=int, default=5, help="survivor commits before the replacement starts")
    ap.add_argument("--fault", choices=["kill", "stop"], default="kill")
    ap.add_argument("--timeout", type=float, default=10.0, help="Manager timeout (collectives, should_commit)")
    ap.add_argument("--pg-timeout", type=float, default=10.0)
    ap.add_argument("--quorum-timeout", type=float, default=60.0)
    ap.add_argument("--join-timeout-ms", type=int, default=60000)
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=5000)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--max-wall", type=float, default=240)
    ap.add_argument("--out", default="")
    ap.add_argument("--rid", type=int, default=0)
    ap.add_argument("--lighthouse", default="")
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    replica(args) if args.mode == "replica" else driver(args)


if __name__ == "__main__":
    main()
