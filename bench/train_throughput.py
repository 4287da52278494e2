"""Training throughput: the plain loop and the same loop inside Ray Train, in one run.

    python bench/train_throughput.py --preset gpt2-124m --steps 60            # on a GPU
    python bench/train_throughput.py --preset debug --steps 200               # CPU smoke
    python bench/train_throughput.py --preset gpt2-124m --set train.micro_batch=32 --set parallel.compile=true

Both paths use the same model, plan, optimizer and train_step (raygpt.train.loop); the
plain one runs in this process with no Ray at all. Prints tokens/s, MFU, peak memory and
step time for each, and their ratio (Ray / plain).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def resolve_warmup(steps: int, warmup: int) -> int:
    """Warmup steps actually used: at least one timed step is left (--steps 5 with the
    default --warmup 10 used to leave none and crash on an unset timer)."""
    if steps < 2:
        raise SystemExit(f"error: --steps {steps}: need at least 2 (one warmup, one timed)")
    return max(1, min(warmup, steps // 2)) if warmup >= steps else max(0, warmup)


def plain_loop(cfg, steps: int, warmup: int) -> dict:
    import torch

    from raygpt.data.prepare import ensure_data, read_meta
    from raygpt.data.loader import BatchLoader
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.loop import batch_geometry, build_optimizer, train_step
    from raygpt.train.metrics import mfu, peak_flops
    from raygpt.train.trainer import amp_dtype, build_model

    device = torch.device("cuda" if torch.cuda.is_available() and cfg.run.use_gpu is not False else "cpu")
    threads = int(cfg.run.cpus_per_worker or torch.get_num_threads())
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = ensure_data(cfg.data)
    meta = read_meta(data)
    model, g = build_model(cfg, meta["vocab_size"])
    fpt = model.flops_per_token()
    plan = resolve_plan(cfg.parallel, 1)
    model = parallelize(model, plan, None, cfg.parallel, device)
    opt = build_optimizer(model, cfg.optim, device.type)
    _, micro, _ = batch_geometry(cfg.train.global_batch, 1, cfg.train.micro_batch)
    loader = BatchLoader(data, "train", g.block_size, cfg.train.global_batch, cfg.train.seed)
    amp = amp_dtype(cfg, device)
    warmup = resolve_warmup(steps, warmup)
    t_start = time.perf_counter()
    for step in range(steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t_start = time.perf_counter()
        loss, _ = train_step(model, opt, loader.get_micro(step, micro), device, amp, cfg.optim.grad_clip)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t_start
    n = steps - warmup
    tps = cfg.train.global_batch * g.block_size * n / dt
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    peak, peak_note = peak_flops(device, threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"tokens_per_s": tps, "mfu": mfu(fpt, tps, peak), "mfu_note": peak_note,
            "step_ms": 1000 * dt / n, "peak_mem_mb": peak_mem, "loss": float(loss), "device": name,
            "timed_steps": n}


def ray_loop(cfg, steps: int, warmup: int) -> dict:
    from raygpt.train.launch import run_training
    from raygpt.train.metrics import read_metrics

    warmup = resolve_warmup(steps, warmup)
    storage = tempfile.mkdtemp(prefix="raygpt-tput-")
    cfg = cfg.model_copy(deep=True)
    cfg.run.storage, cfg.run.name = storage, "tput"
    cfg.train.max_steps = steps
    # The first log window is the warmup (compile); the figure is over all later windows.
    cfg.train.log_every = max(1, warmup)
    cfg.train.eval_every = steps
    cfg.train.eval_steps = 1
    cfg.checkpoint.every = 0
    s = run_training(cfg, progress=False)
    recs = [r for r in read_metrics(s["run_dir"]) if "tokens_per_s" in r]
    return timed_windows(recs, warmup, cfg.train.global_batch * cfg.model.block_size)


def timed_windows(recs: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """tokens/s, MFU and step time over the log windows after `warmup` steps (each
    window weighted by its steps), from metrics.jsonl records."""
    prev, steps, seconds = 0, 0, 0.0
    for r in recs:
        n = r["step"] - prev
        if prev >= warmup:
            steps += n
            seconds += n * r["step_ms"] / 1000
        prev = r["step"]
    last = recs[-1]
    tps = tokens_per_step * steps / seconds if seconds else last["tokens_per_s"]
    mfu = None if last.get("mfu") is None else last["mfu"] * tps / last["tokens_per_s"]
    return {"tokens_per_s": tps, "mfu": mfu, "step_ms": 1000 * seconds / steps if steps else last["step_ms"],
            "peak_mem_mb": last.get("peak_mem_mb"), "loss": last.get("loss"), "timed_steps": steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    from raygpt.config import load_config

    cfg = load_config(args.preset, overrides=[f"train.max_steps={args.steps}", "run.num_workers=1", *args.set])
    out = compare(cfg, args.steps, args.warmup, skip_plain=args.skip_plain, skip_ray=args.skip_ray)
    out["preset"] = args.preset
    print(json.dumps(out, indent=1))

    def pct(r):
        return "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"

    parts = [f"{k} {out[k]['tokens_per_s']:,.0f} tok/s (MFU {pct(out[k])})" for k in ("plain", "ray_train") if out[k]]
    ratio = f" | ratio {out['ratio']:.3f}" if out["ratio"] else ""
    print("\n" + " | ".join(parts) + ratio, file=sys.stderr)


def compare(cfg, steps: int, warmup: int, skip_plain: bool = False, skip_ray: bool = False) -> dict:
    """Plain loop then Ray Train, same config: {plain, ray_train, ratio}."""
    plain = None if skip_plain else plain_loop(cfg, steps, warmup)
    import gc

    import torch

    gc.collect()  # the plain loop's model, optimizer and cached blocks leave the GPU first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ray_r = None if skip_ray else ray_loop(cfg, steps, warmup)
    ratio = ray_r["tokens_per_s"] / plain["tokens_per_s"] if plain and ray_r else None
    return {"plain": plain, "ray_train": ray_r, "ratio": ratio}


if __name__ == "__main__":
    main()
