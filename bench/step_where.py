"""Where the CPU step loses time: the same train_step of the default preset's model, timed in
three places in turn: this process, a Ray task, and a Ray Train worker (TorchTrainer).

    flock /tmp/raygpt-heavy.lock python bench/step_where.py --rounds 2

Each place builds the model and optimizer, warms up, then times `--blocks` blocks of
`--steps` steps with fixed random batches (no loader, no logging, no hooks): a difference
between the places is the process environment, not raygpt's loop. Then it times small
OpenMP parallel regions alone (`region_us`: how fast the team wakes). Prints the median
block (ms per step) of each place per round, and each place's median over the rounds.
Numbers, not pass/fail (issue 29).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def region_us(threads: int, n: int = 2000) -> float:
    """Microseconds per small OpenMP parallel region (an in-place add of 200k floats with a
    little Python between): how fast the OpenMP team wakes, apart from the model."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(200_000), torch.randn(200_000)
    for _ in range(200):
        a.add_(b)
    out = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(n):
            a.add_(b)
            _ = str(i)
        out.append(1e6 * (time.perf_counter() - t) / n)
    return statistics.median(out)


def time_steps(blocks: int, steps: int, threads: int) -> dict:
    import torch

    from raygpt.config import load_config
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.loop import build_optimizer, train_step
    from raygpt.train.trainer import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(None, [])
    vocab = 65  # the bundled Shakespeare's characters
    model, g = build_model(cfg, vocab)
    model = parallelize(model, resolve_plan(cfg.parallel, 1), None, cfg.parallel, torch.device("cpu"))
    opt = build_optimizer(model, cfg.optim, "cpu")
    x = torch.randint(0, vocab, (cfg.train.micro_batch, g.block_size))
    y = torch.randint(0, vocab, (cfg.train.micro_batch, g.block_size))
    dev = torch.device("cpu")
    for _ in range(20):
        train_step(model, opt, [(x, y)], dev, None, cfg.optim.grad_clip)
    out = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, [(x, y)], dev, None, cfg.optim.grad_clip)
        out.append(1000 * (time.perf_counter() - t) / steps)
    return {"blocks_ms": out, "region_us": region_us(threads)}


def in_ray_task(blocks, steps, threads):
    import ray

    f = ray.remote(num_cpus=threads, max_calls=1)(time_steps)
    return ray.get(f.remote(blocks, steps, threads))


def in_train_worker(blocks, steps, threads):
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(tempfile.mkdtemp(prefix="raygpt-where-"), "ms.json")

    def fn(c):  # the worker runs on this machine: its figures come back through a file
        with open(c["out"], "w") as f:
            json.dump(time_steps(c["blocks"], c["steps"], c["threads"]), f)

    TorchTrainer(fn, train_loop_config={"blocks": blocks, "steps": steps, "threads": threads, "out": out},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                 run_config=RunConfig(storage_path=os.path.dirname(out), name="where")).fit()
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")  # as raygpt's embedded Ray
    import ray

    ray.init(address="local", num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
    places = {"process": time_steps, "ray_task": in_ray_task, "train_worker": in_train_worker}
    seen = {k: [] for k in places}
    try:
        for r in range(a.rounds):
            for name, fn in places.items():
                got = fn(a.blocks, a.steps, a.threads)
                seen[name].append(statistics.median(got["blocks_ms"]))
                print(json.dumps({"round": r + 1, "place": name, "median_ms": round(seen[name][-1], 2),
                                  "region_us": round(got["region_us"], 1),
                                  "blocks_ms": [round(v, 1) for v in got["blocks_ms"]]}), flush=True)
    finally:
        ray.shutdown()
    base = statistics.median(seen["process"])
    print(" | ".join(f"{k} {statistics.median(v):.2f} ms ({statistics.median(v) / base:.3f}x)" for k, v in seen.items()))


if __name__ == "__main__":
    sys.exit(main())
