"""One command for a GPU box: everything a first GPU run must show, in one JSON report.

    python bench/gpu_check.py --out $OUT/gpu_check.json           # on the GPU machine (~8 min on one H200)
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke.json   # every stage, tiny, on CPU

On the project's GPU machine (no registry there; Ray travels as a bundle, see
docs/performance.md "GPU"):

    bash /work/shared/gpu/bundle.sh          # here, once, in the checkout's root (builds .gpu/)
    source .gpu/setup.sh && python3 bench/gpu_check.py --out $OUT/gpu_check.json    # there

Stages (each timed, each failure recorded and the next stage run; the report is
rewritten after every stage, so a run cut short still leaves what it measured):

- env          torch / CUDA / device name, the MFU peak used for it (or why none)
- sweep        (only when asked: --stages env,sweep,throughput) the plain loop under each
               variant of SWEEP (attention kernel, fused q/k/v, autotuned compile), each in
               its own process; the fastest one's overrides go to the throughput stage
- throughput   gpt2-124m, compile + bf16: the plain loop vs the same loop under Ray Train
               (tokens/s, MFU, peak memory, ratio)
- checkpoint   gpt2-124m under Ray Train with an async save every few steps: seconds each
               save blocks training, as a fraction of the training time between saves
- shakespeare  the shakespeare-char recipe below to its target: first eval with val <= 1.47,
               and the training seconds (evals excluded) it took
- tests        pytest tests/gpu (NCCL, bf16, async DCP saves; multi-GPU ones skip on one GPU)
- plans        with >= 2 GPUs: ddp / fsdp / tp / pp (and hsdp with 4) on gpt2-124m, a few
               steps each (tokens/s, loss)

`checks` at the end says which targets were met (null: not measured).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # raygpt from this checkout, and bench.* beside it

# shakespeare-char to val <= 1.47 within 60 s of training: nanoGPT's baby GPT (6L/6H/384,
# block 256, batch 64, dropout 0.2, lr 1e-3) reached 1.474 at step 1750 of a 5000-step
# cosine (~70 s on an H100, evals included). Here the cosine ends at 2500 steps, so the
# rate is already low where that run was still at 0.78e-3, with bf16 + whole-model
# compile, and evals (50 batches every 250 steps) are not counted as training time.
SHAKESPEARE_RECIPE = ["train.max_steps=2500", "optim.decay_steps=2500", "optim.warmup_steps=100",
                      "optim.lr=1e-3", "optim.min_lr=1e-4", "train.eval_every=250", "train.eval_steps=50",
                      "train.log_every=50", "checkpoint.every=0", "parallel.compile=true"]
SHAKESPEARE_TARGET = 1.47
SHAKESPEARE_SECONDS = 60.0

# The throughput model: gpt2-124m's shape on the bundled corpus (tokens are ids; the text
# does not matter for speed, and a char vocabulary prepares in a second).
# Micro batch 64, no accumulation: on the H200 (2026-11-30) Ray Train gave 43.4% MFU at
# 32 x 2 and 45.2% at 64 x 1 (29 GB peak, fits an 80 GB H100). The preset's 16 was sized
# for fp32 logits that whole-model compile no longer keeps.
GPT2 = ["data.tokenizer=char", "parallel.compile=true", "train.global_batch=64", "train.micro_batch=64"]

# The `sweep` stage: plain-loop variants of GPT2, each in its own process (a compile that
# runs long is cut off by its timeout, and SDPA's process-wide kernel choice cannot leak
# into the next). The fastest one's overrides then feed the `throughput` stage. Ordered by
# what each is expected to be worth; `separate-qkv` measures the fused q/k/v matmul.
SWEEP = {
    "base": [],
    "cudnn": ["parallel.attention=cudnn"],
    # Micro batch 128 (~58 GB at 64 x 1024 tokens -> 29 GB): 64 gave +2 points over 32.
    "cudnn-micro128": ["parallel.attention=cudnn", "train.global_batch=128", "train.micro_batch=128"],
    "cudnn-separate-qkv": ["parallel.attention=cudnn", "parallel.fuse_qkv=false"],
    "cudnn-autotune": ["parallel.attention=cudnn", "parallel.inductor_mode=max-autotune-no-cudagraphs"],
}
# Run by default: ~90 s each on the H200 (a whole-model compile is ~70 s there). The
# others by name (--sweep ...); the autotuned compile takes minutes more.
SWEEP_DEFAULT = ("base", "cudnn", "cudnn-micro128")
SWEEP_SMOKE = {"base": [], "math": ["parallel.attention=math", "parallel.fuse_qkv=false"]}

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.global_batch=8", "train.micro_batch=4", "parallel.compile=false", "run.cpus_per_worker=1"]


class Report:
    """The JSON report, rewritten (temp file + rename) after each stage."""

    def __init__(self, path: Path, smoke: bool):
        self.path = path
        self.data = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_smoke": smoke, "stages": {}}

    def stage(self, name: str, result: dict) -> None:
        self.data["stages"][name] = result
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _load(preset: str, sets: list[str], storage: str | None = None, name: str | None = None):
    from raygpt.config import load_config

    extra = [f"run.storage={storage}", f"run.name={name}"] if storage else []
    return load_config(preset, overrides=[*sets, *extra])


# ---------------------------------------------------------------- stages

def stage_env(args) -> dict:
    import torch

    from raygpt.train.metrics import peak_flops

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available()}
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError as e:
        out["ray"] = f"missing: {e}"
    if torch.cuda.is_available():
        dev = torch.device("cuda", 0)
        out.update(device=torch.cuda.get_device_name(dev), device_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda, memory_gb=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1),
                   bf16=torch.cuda.is_bf16_supported())
        peak, note = peak_flops(dev)
    else:
        out.update(device="cpu", device_count=0)
        peak, note = peak_flops(torch.device("cpu"), torch.get_num_threads())
    out.update(peak_flops=peak, peak_note=note)
    return out


def stage_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/gpu"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout)
    lines = (r.stdout + r.stderr).strip().splitlines()
    return {"rc": r.returncode, "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - t0, 1),
            "ok": r.returncode in (0, 5),  # 5: nothing collected/ran (no CUDA: all skipped)
            "tail": lines[-15:] if r.returncode not in (0, 5) else None}


def _model(args, user_sets: bool = False) -> tuple[str, list[str]]:
    """(preset, overrides) of the stages' model: tiny on --cpu-smoke, else gpt2-124m
    (with --set when `user_sets`: the throughput and sweep stages)."""
    if args.cpu_smoke:
        return "debug", list(TINY)
    return "gpt2-124m", [*GPT2, *(args.set if user_sets else ())]


def _tput_cfg(args, extra=()):
    preset, base = _model(args, user_sets=True)
    steps, warmup = (6, 2) if args.cpu_smoke else (args.tput_steps, args.tput_warmup)
    return _load(preset, [*base, *extra, "run.num_workers=1"]), steps, warmup


def stage_throughput(args, best: list[str] | None = None) -> dict:
    """Plain loop vs Ray Train; with the sweep's fastest variant when the sweep ran."""
    import torch

    from bench.train_throughput import compare

    cfg, steps, warmup = _tput_cfg(args, best or ())
    out = compare(cfg, steps, warmup)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out["steps"], out["warmup"], out["variant_sets"] = steps, warmup, list(best or [])
    return out


def stage_sizes(args) -> dict:
    """Models larger than gpt2-124m (issue 29: gpt2-medium, gpt2-xl), plain loop vs Ray
    Train, each at its preset's micro batch (the largest that fits beside fp32 AdamW
    state), a short global batch so that a step stays near a second; its MFU reported."""
    import torch

    from bench.train_throughput import compare

    out = {}
    for name in [n for n in args.sizes.split(",") if n]:
        if args.cpu_smoke:
            preset, sets, steps, warmup = "debug", list(TINY), 4, 1
        else:
            micro = _load(name, []).train.micro_batch
            preset, steps, warmup = name, args.sizes_steps, args.sizes_warmup
            sets = ["data.tokenizer=char", "parallel.compile=true", f"train.micro_batch={micro}",
                    f"train.global_batch={micro * args.sizes_accum}"]
        try:
            out[name] = compare(_load(preset, [*sets, "run.num_workers=1"]), steps, warmup)
        except Exception as e:  # one size failing (memory) leaves the other's figures
            out[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _sweep_one(args, sets: list[str], timeout: float) -> dict:
    """One plain-loop variant in a child process -> its figures, or why there are none."""
    preset, base = _model(args, user_sets=True)
    steps, warmup = (4, 1) if args.cpu_smoke else (args.sweep_steps, args.sweep_warmup)
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--preset", preset, "--skip-ray",
           "--steps", str(steps), "--warmup", str(warmup)]
    for kv in [*base, *sets]:
        cmd += ["--set", kv]
    t0 = time.perf_counter()
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"cut off after {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    res = {"seconds": round(time.perf_counter() - t0, 1)}
    if r.returncode != 0:
        return {**res, "error": f"exit {r.returncode}", "tail": (r.stdout + r.stderr).strip().splitlines()[-12:]}
    plain = json.loads(r.stdout)["plain"]
    return {**res, **{k: plain.get(k) for k in ("tokens_per_s", "mfu", "step_ms", "peak_mem_mb", "loss")}}


def stage_sweep(args) -> dict:
    """Plain-loop variants (SWEEP), each in its own process within the sweep's budget;
    `best` is the fastest one that ran."""
    table = SWEEP_SMOKE if args.cpu_smoke else SWEEP
    names = ([n.strip() for n in args.sweep.split(",") if n.strip()] if args.sweep
             else list(table) if args.cpu_smoke else list(SWEEP_DEFAULT))
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"--sweep: unknown variants {unknown}; known: {', '.join(table)}")
    t0, out = time.perf_counter(), {"variants": {}}
    for name in names:
        left = args.sweep_budget_s - (time.perf_counter() - t0)
        if left < 30:
            out["variants"][name] = {"skipped": f"sweep budget of {args.sweep_budget_s:.0f} s spent"}
            continue
        res = _sweep_one(args, table[name], min(left, args.sweep_variant_timeout))
        out["variants"][name] = {"sets": table[name], **res}
        print(f"[gpu_check] sweep {name}: {json.dumps(res)[:300]}", file=sys.stderr, flush=True)
    ran = {n: v for n, v in out["variants"].items() if v.get("tokens_per_s")}
    if ran:
        best = max(ran, key=lambda n: ran[n]["tokens_per_s"])
        out.update(best=best, best_sets=ran[best]["sets"], best_mfu=ran[best]["mfu"])
    return out


def _first_at_target(run_dir: Path, target: float):
    from raygpt.train.metrics import read_metrics

    for r in read_metrics(run_dir):
        if r.get("val_loss") is not None and r["val_loss"] <= target:
            return r
    return None


def stage_shakespeare(args, storage: str) -> dict:
    from raygpt.train.launch import run_training

    if args.cpu_smoke:
        sets = [*TINY, "train.max_steps=20", "train.eval_every=10", "train.eval_steps=2", "checkpoint.every=0"]
        cfg = _load("shakespeare-char", sets, storage, "shakespeare")
    else:
        cfg = _load("shakespeare-char", [*SHAKESPEARE_RECIPE, "run.num_workers=1"], storage, "shakespeare")
    s = run_training(cfg, progress=False)
    hit = _first_at_target(Path(s["run_dir"]), SHAKESPEARE_TARGET)
    return {"recipe": SHAKESPEARE_RECIPE if not args.cpu_smoke else "tiny (smoke)",
            "best_val_loss": s.get("best_val_loss"), "final_val_loss": s.get("final_val_loss"),
            "train_seconds": s.get("train_seconds"), "tokens_per_s": s.get("tokens_per_s"),
            "target": SHAKESPEARE_TARGET, "reached_at_step": hit["step"] if hit else None,
            "reached_after_train_s": hit.get("train_seconds") if hit else None}


def save_costs(recs: list[dict], every: int, steps: int) -> dict:
    """From one run's metrics.jsonl (log_every=1, async saves every `every` steps): what
    each save blocked, and what its background write cost the steps it overlapped.

    A save at step s is reported by an event that follows the record of the step during
    which every rank saw its write done; the write overlapped steps s+1 .. that step + 1
    (one step of margin). `lost_s` is those steps' time above the median of the steps
    that overlapped no write (compile warmup, the first `every` steps, excluded)."""
    saves = [r for r in recs if r.get("event") == "checkpoint" and r["step"] < steps]  # the last save is sync
    last_step, overlap = 0, {}
    for r in recs:
        if "step_ms" in r and "event" not in r:
            last_step = r["step"]
        elif r.get("event") == "checkpoint_reported" and r["step"] < steps:
            overlap[r["step"]] = range(r["step"] + 1, min(last_step + 1, steps) + 1)
    step_ms = {r["step"]: r["step_ms"] for r in recs if "step_ms" in r and "event" not in r}
    busy = {i for w in overlap.values() for i in w} | {s["step"] for s in saves}
    clean = sorted(ms for i, ms in step_ms.items() if i > every and i not in busy)
    med = clean[len(clean) // 2] if clean else None
    blocked = [r["blocked_s"] for r in saves[1:]] or [r["blocked_s"] for r in saves]  # first save warms up
    mean_blocked = sum(blocked) / len(blocked) if blocked else None
    lost = [round(sum(max(0.0, step_ms.get(i, med) - med) for i in w) / 1000, 4)
            for _, w in sorted(overlap.items())] if med else []
    lost = lost[1:] if len(lost) > 1 else lost  # like blocked: the first save warms up
    frac = mean_blocked / (every * med / 1000) if (mean_blocked is not None and med) else None
    return {"every": every, "asynchronous": [r.get("asynchronous") for r in saves], "blocked_s": blocked,
            "step_ms_median": med, "blocked_fraction": frac, "write_steps": {s: len(w) for s, w in overlap.items()},
            "lost_s": lost,
            "lost_fraction": (sum(lost) / len(lost)) / (every * med / 1000) if (lost and med) else None}


def stage_checkpoint(args, storage: str) -> dict:
    """Async saves every `every` steps, once per checkpoint.async_mode: seconds each save
    blocks, and what the background write costs the steps it overlaps."""
    from raygpt.train.launch import run_training
    from raygpt.train.metrics import read_metrics

    every, steps = (5, 15) if args.cpu_smoke else (10, 40)
    preset, base = _model(args)
    out = {}
    for mode in [m.strip() for m in args.ckpt_modes.split(",") if m.strip()]:
        sets = [*base, f"train.max_steps={steps}", f"checkpoint.every={every}", "checkpoint.keep=1",
                "checkpoint.async_save=true", f"checkpoint.async_mode={mode}", "train.log_every=1",
                f"train.eval_every={steps}", "train.eval_steps=1", "run.num_workers=1"]
        cfg = _load(preset, sets, storage, f"ckpt-{mode}")
        # On CPU saves are synchronous unless forced (the smoke checks the async path).
        s = run_training(cfg, progress=False, inject={"async_save_on_cpu": True} if args.cpu_smoke else None)
        out[mode] = save_costs(read_metrics(s["run_dir"]), every, steps)
    first = out[next(iter(out))] if out else {}
    # Top-level figures: the default mode's (thread), for checks() and earlier reports.
    return {**out.get("thread", first), "modes": out}


def stage_plans(args, storage: str) -> dict:
    import torch

    from raygpt.train.launch import run_training

    n = 2 if args.cpu_smoke else torch.cuda.device_count()
    if n < 2:
        return {"skipped": f"needs >= 2 GPUs (NCCL: one rank per device); this box has {n}"}
    plans = {"ddp": ["parallel.strategy=ddp"], "fsdp": ["parallel.strategy=fsdp"],
             "tp": ["parallel.strategy=tp", "parallel.tp_degree=2"],
             "pp": ["parallel.pp_degree=2", "parallel.strategy=fsdp"]}
    if n >= 4:
        plans["hsdp"] = ["parallel.strategy=hsdp", "parallel.shard_degree=2"]
    if args.cpu_smoke:
        plans = {"fsdp": plans["fsdp"]}
    out = {}
    for name, extra in plans.items():
        world = 4 if name == "hsdp" else 2
        base = TINY if args.cpu_smoke else [*GPT2, "parallel.compile=false"]
        sets = [*base, *extra, f"run.num_workers={world}", "train.max_steps=20", "train.log_every=10",
                "train.eval_every=20", "train.eval_steps=1", "checkpoint.every=0"]
        t0 = time.perf_counter()
        try:
            s = run_training(_load("debug" if args.cpu_smoke else "gpt2-124m", sets, storage, f"plan-{name}"),
                             progress=False)
            out[name] = {"world": world, "plan": s.get("plan"), "tokens_per_s": s.get("tokens_per_s"),
                         "mfu": s.get("mfu"), "final_val_loss": s.get("final_val_loss"),
                         "peak_mem_mb": s.get("peak_mem_mb"), "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return out


def checks(data: dict) -> dict:
    st = data["stages"]
    tp, sh, ck = st.get("throughput", {}), st.get("shakespeare", {}), st.get("checkpoint", {})

    ray_mfu = (tp.get("ray_train") or {}).get("mfu")
    t = sh.get("reached_after_train_s")
    return {
        "gpu_tests_pass": st.get("tests", {}).get("ok"),
        "ray_mfu_ge_50pct": None if ray_mfu is None else ray_mfu >= 0.5,
        "ray_over_plain_ge_0.98": None if tp.get("ratio") is None else tp["ratio"] >= 0.98,
        "shakespeare_le_1.47_within_60s": None if "best_val_loss" not in sh else (t is not None and t <= SHAKESPEARE_SECONDS),
        "checkpoint_blocking_lt_5pct": None if ck.get("blocked_fraction") is None else ck["blocked_fraction"] < 0.05,
    }


# The figures first, the tests after them: on a short lease a cut-off run still has them.
STAGES = ("env", "sweep", "throughput", "checkpoint", "shakespeare", "tests", "plans", "sizes")
DEFAULT_STAGES = ("env", "throughput", "checkpoint", "shakespeare", "tests", "plans", "sizes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    ap.add_argument("--out", type=Path, default=default_out, help="JSON report path")
    ap.add_argument("--cpu-smoke", action="store_true", help="every stage, tiny, on CPU (checks the script)")
    ap.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)} (default: all but sweep)")
    ap.add_argument("--tput-steps", type=int, default=60)
    ap.add_argument("--tput-warmup", type=int, default=15)
    ap.add_argument("--sweep", default="", help=f"variants of the sweep stage, of {','.join(SWEEP)} "
                                                 f"(default {','.join(SWEEP_DEFAULT)})")
    ap.add_argument("--sweep-steps", type=int, default=30)
    ap.add_argument("--sweep-warmup", type=int, default=10)
    ap.add_argument("--sweep-budget-s", type=float, default=330)
    ap.add_argument("--sweep-variant-timeout", type=float, default=150,
                    help="seconds one variant may take (cudnn-autotune: give it 400)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the throughput stage's gpt2-124m (repeatable)")
    ap.add_argument("--ckpt-modes", default="thread",
                    help="checkpoint.async_mode values the checkpoint stage measures (thread,process: ~70 s each)")
    ap.add_argument("--sizes", default="gpt2-medium,gpt2-xl", help="presets the sizes stage runs")
    ap.add_argument("--sizes-steps", type=int, default=10)
    ap.add_argument("--sizes-warmup", type=int, default=4)
    ap.add_argument("--sizes-accum", type=int, default=2, help="micro batches per step in the sizes stage")
    ap.add_argument("--tests-timeout", type=int, default=240)
    ap.add_argument("--storage", default=None, help="run storage (default: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=540, help="stages not started by then are skipped")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"error: --stages: unknown {bad}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run even on a GPU box
    report = Report(args.out, args.cpu_smoke)
    storage = args.storage or tempfile.mkdtemp(prefix="raygpt-gpucheck-")
    t_all = time.perf_counter()
    ray_started = False
    for name in stages:
        if time.perf_counter() - t_all > args.budget_s:
            report.stage(name, {"skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            if name == "tests" and ray_started:
                import ray

                ray.shutdown()  # pytest starts its own instance, with the GPU free
                ray_started = False
            if name in ("throughput", "shakespeare", "checkpoint", "plans", "sizes"):
                import ray

                if not ray.is_initialized():  # one Ray for every stage that trains under it
                    from raygpt.train.launch import init_ray

                    ray_started = init_ray(None) or ray_started
            fn = globals()[f"stage_{name}"]
            if name in ("shakespeare", "checkpoint", "plans"):
                res = fn(args, storage)
            elif name == "throughput":
                res = fn(args, report.data["stages"].get("sweep", {}).get("best_sets"))
            else:
                res = fn(args)
        except Exception as e:
            res = {"error": f"{type(e).__name__}: {e}"[:1000], "traceback": traceback.format_exc()[-3000:]}
        res["stage_seconds"] = round(time.perf_counter() - t0, 1)
        report.stage(name, res)
        print(f"[gpu_check] {name}: {json.dumps(res, default=str)[:400]}", file=sys.stderr, flush=True)
    report.data["checks"] = checks(report.data)
    report.data["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report.write()
    if ray_started:
        import ray

        ray.shutdown()
    print(json.dumps(report.data["checks"], indent=1))
    print(f"report: {args.out}", file=sys.stderr)
    errors = [n for n, r in report.data["stages"].items() if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
