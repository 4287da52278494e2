"""Compile cache kept with the run: the first step of a cold start against restarts
that find it, each start a fresh process (the Ray-free Trainer, one gloo rank,
parallel.compile=true), in another working directory each time.

    python bench/compile_cache.py                                  # debug preset
    python bench/compile_cache.py --preset shakespeare-char-cpu --preset debug

Per preset, one run directory, in turn:
  cold           a fresh node: an empty inductor cache (TORCHINDUCTOR_CACHE_DIR), no artifacts yet
  other node     a restart on a fresh node: an empty inductor cache, the run's artifacts
                 and (CPU) its kernel bundle
  other node, artifacts only   the same without the kernel bundle (torch's portable
                 artifacts alone; the C++ kernels are compiled again)
  other node, cache off   the same restart with parallel.compile_cache=false
  same node      a restart on the first node: its inductor cache kept, and the artifacts
  same node, cache off    its inductor cache only (what a cache directory on shared storage gives)
Each restart restores the previous segment's checkpoint and trains 2 more steps. The
figures are the run's own metrics: the `start` event's compile_cache and the first
step record's first_step_ms and FX graph cache hits/misses.

    python bench/compile_cache.py --start --data D --run-dir R --steps N [--set k=v ...]
runs one start (what the scenarios above run) and prints its figures as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_start(preset: str, data: str, run_dir: str, steps: int, sets: list[str]) -> dict:
    """Build, restore the run's latest checkpoint, train to `steps`; -> this start's figures."""
    import datetime
    import socket

    import torch.distributed as dist

    from raygpt.config import load_config
    from raygpt.train.metrics import read_metrics
    from raygpt.train.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load_config(preset, overrides=[
        f"data.path={data}", "parallel.compile=true", f"train.max_steps={steps}", "train.log_every=1",
        f"train.eval_every={steps}", "train.eval_steps=1", "optim.decay_steps=1000", "checkpoint.every=0",
        "run.cpus_per_worker=2", *sets])
    t0 = time.perf_counter()
    tr = Trainer(cfg, data, run_dir=Path(run_dir), ckpt_root=Path(run_dir))
    choice = tr.ckpt.choose_restore(None)
    if choice is not None:
        tr.restore(choice)
    tr.train()
    wall = time.perf_counter() - t0
    dist.destroy_process_group()
    recs = read_metrics(run_dir)
    i = max(i for i, r in enumerate(recs) if r.get("event") == "start")
    start = recs[i]
    first = next(r for r in recs[i:] if "first_step_ms" in r)
    return {"compile_cache": start.get("compile_cache"), "loaded_bytes": start.get("compile_cache_bytes", 0),
            "loaded_kernels": start.get("compile_cache_kernels", 0),
            "first_step_s": first["first_step_ms"] / 1000, "fx_hits": first.get("compile_cache_hits"),
            "fx_misses": first.get("compile_cache_misses"), "from_step": start["step"], "wall_s": round(wall, 2)}


def _child(preset: str, data: Path, run_dir: Path, steps: int, node: Path, cwd: Path, sets=()) -> dict:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(node),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "compile_cache.py"), "--start", "--preset", preset,
           "--data", str(data), "--run-dir", str(run_dir), "--steps", str(steps)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


SCENARIOS = [  # name, node, extra settings
    ("cold", "node1", ()),
    ("other node", "node2", ()),
    ("other node, artifacts only", "node2b", ()),
    ("other node, cache off", "node3", ("parallel.compile_cache=false",)),
    ("same node", "node1", ()),
    ("same node, cache off", "node1", ("parallel.compile_cache=false",)),
]


def bench(preset: str, work: Path, data: Path) -> list[dict]:
    run_dir = work / preset / "run"
    rows = []
    for k, (name, node, sets) in enumerate(SCENARIOS):
        bundles = list((run_dir / "compile_cache").glob("*/*.kernels.tar")) if "artifacts only" in name else []
        for b in bundles:
            b.rename(b.with_suffix(".aside"))
        got = _child(preset, data, run_dir, 2 * (k + 1), work / preset / node, work / preset / f"cwd{k}", sets)
        for b in bundles:
            b.with_suffix(".aside").replace(b)
        rows.append({"preset": preset, "scenario": name, **got})
        print(f"{preset:22s} {name:24s} {got['compile_cache']:5s} first step {got['first_step_s']:7.2f} s  "
              f"fx graphs hit {got['fx_hits']} / compiled {got['fx_misses']}  "
              f"artifacts {got['loaded_bytes'] / 1e6:.2f} MB + {got['loaded_kernels']} kernels  "
              f"process {got['wall_s']:.1f} s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="debug (default), shakespeare-char-cpu, ...")
    ap.add_argument("--start", action="store_true", help="one start in this process (see above)")
    ap.add_argument("--data")
    ap.add_argument("--run-dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    presets = a.preset or ["debug"]
    if a.start:
        print(json.dumps(one_start(presets[0], a.data, a.run_dir, a.steps, a.sets)))
        return 0
    from raygpt.data.prepare import prepare_corpus

    rows = []
    with tempfile.TemporaryDirectory(prefix="raygpt-compile-cache-") as tmp:
        data = Path(tmp) / "data"
        prepare_corpus(None, data, tokenizer="char")
        for p in presets:
            rows += bench(p, Path(tmp), data)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
