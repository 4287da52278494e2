"""The default `raygpt train` beside nanoGPT's train.py on the same model and steps (CPU),
whole processes in turn, N runs each: wall time, val loss and step tokens/s.

    flock /tmp/raygpt-heavy.lock python bench/cpu_vs_nanogpt.py --nanogpt /tmp/nanogpt --runs 2

--nanogpt: a nanoGPT work tree whose data/shakespeare_char/prepare.py has been run (copy
raygpt/assets/tinyshakespeare.txt there as input.txt first). Prints one JSON line per
run and a summary: raygpt's step tokens/s (median of its log windows after the first)
against nanoGPT's (768 tokens over the median iteration time), and the wall-time ratio.
Numbers, not pass/fail (issue 29: step within 10%, whole run within 1.2x).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANO_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
             "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
             "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
TOKENS_PER_STEP = 12 * 64


def run_nanogpt(tree: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py", *NANO_ARGS], cwd=tree, capture_output=True,
                         text=True, check=True).stdout
    wall = time.perf_counter() - t0
    vals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", out)
    # the mean iteration after the first 50 (warm-up), eval iterations left out: the
    # same measure as raygpt's log windows (mean step time, evals not counted)
    iters = re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)
    step_ms = statistics.mean(float(t) for i, t in iters if int(i) >= 50 and int(i) % 250)
    return {"who": "nanogpt", "wall_s": round(wall, 1), "val_loss": float(vals[-1][1]),
            "step_ms": round(step_ms, 2), "tokens_per_s": round(TOKENS_PER_STEP * 1000 / step_ms)}


def run_raygpt(workdir: Path) -> dict:
    t0 = time.perf_counter()
    subprocess.run(["raygpt", "train"], cwd=workdir, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    run_dir = max((workdir / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    windows = [r["step_ms"] for r in recs if "step_ms" in r][1:]  # the first window: warm-up
    s = json.loads((run_dir / "summary.json").read_text())
    step_ms = statistics.median(windows)
    ev = {r["event"]: r for r in recs if "event" in r}
    return {"who": "raygpt", "wall_s": round(wall, 1), "val_loss": round(s["final_val_loss"], 4),
            "step_ms": round(step_ms, 2), "tokens_per_s": round(TOKENS_PER_STEP * 1000 / step_ms),
            "train_seconds": s["train_seconds"],
            "launch_to_start_s": round(ev["start"]["time"] - ev["launch"]["started"], 1)
            if "start" in ev and "launch" in ev else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", required=True, type=Path, help="nanoGPT work tree (data prepared)")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raygpt-vs-nano-"))
    rows = []
    for i in range(args.runs):
        for fn, arg in ((run_nanogpt, args.nanogpt), (run_raygpt, work)):
            rows.append(dict(fn(arg), run=i + 1))
            print(json.dumps(rows[-1]), flush=True)
    by = {w: [r for r in rows if r["who"] == w] for w in ("nanogpt", "raygpt")}
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "tokens_per_s")} for w, rs in by.items()}
    print(f"step tokens/s: raygpt {med['raygpt']['tokens_per_s']:,.0f} / nanoGPT "
          f"{med['nanogpt']['tokens_per_s']:,.0f} = {med['raygpt']['tokens_per_s'] / med['nanogpt']['tokens_per_s']:.3f}"
          f" | wall: {med['raygpt']['wall_s']:.1f} / {med['nanogpt']['wall_s']:.1f} s = "
          f"{med['raygpt']['wall_s'] / med['nanogpt']['wall_s']:.2f}x | val: raygpt "
          f"{[r['val_loss'] for r in by['raygpt']]} nanoGPT {[r['val_loss'] for r in by['nanogpt']]}")


if __name__ == "__main__":
    main()
