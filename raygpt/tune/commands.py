"""`raygpt tune`: hyperparameter search (quality) and the throughput planner. Heavy
imports (ray, torch) stay inside the command."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from raygpt.errors import UserError
from raygpt.files import is_uri


def build_spec(config=None, preset=None, sets=None, space=None, mode="quality", num_samples=8,
               out=None, address=None, max_concurrent=None, search="random", steps=None,
               seed=None, storage=None, reduction_factor=2):
    """Check everything that can be checked without Ray and return the SweepSpec."""
    from raygpt.train.runconfig import build_run_config
    from raygpt.tune.runner import MODES, SEARCHES, SweepSpec
    from raygpt.tune.space import check_constants, load_space

    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: expected quality or throughput")
    if search not in SEARCHES:
        raise UserError(f"--search {search!r}: expected one of {', '.join(SEARCHES)}")
    if num_samples < 1:
        raise UserError(f"--num-samples {num_samples}: expected >= 1")
    if steps is not None and steps < 2:
        raise UserError(f"--steps {steps}: a throughput trial needs at least 2 steps")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent {max_concurrent}: expected >= 1")
    if reduction_factor < 2:
        raise UserError(f"--reduction-factor {reduction_factor}: expected >= 2")
    cfg = build_run_config(config, preset, sets, address=address)
    base = cfg.to_dict()
    base["run"]["storage"] = None
    base["run"]["name"] = None
    sp = None
    if space is not None:
        s = load_space(space)
        check_constants(base, s)
        sp = s.to_dict()
    if storage and not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    if out is None:
        out = f"tune/{cfg.preset or 'run'}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    return SweepSpec(mode=mode, base=base, space=sp, out=str(Path(out).expanduser().resolve()),
                     num_samples=num_samples, search=search, max_concurrent=max_concurrent,
                     steps=steps, seed=seed, address=address or cfg.run.address,
                     storage=storage, reduction_factor=reduction_factor)


def tune_cmd(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (the base of every trial)"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="named preset (debug, shakespeare-char-cpu, ...)"),
    space: Optional[str] = typer.Option(None, "--space", help="search space YAML (default: one per mode)"),
    mode: str = typer.Option("quality", "--mode", "-m", help="quality (ASHA on val loss) or throughput (the planner)"),
    num_samples: int = typer.Option(8, "--num-samples", "-n", help="quality: samples of the space (a grid repeats this often)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output directory (default ./tune/<preset>-<mode>-<time>)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="override a base field: section.field=value (repeatable)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray address ('auto' joins a running cluster); default: local"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="at most this many trials at once (default: what the cluster fits)"),
    search: str = typer.Option("random", "--search", help="random (grid + random sampling) or optuna (TPE via Tune's OptunaSearch)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="throughput: steps per measurement trial (default 10)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random search"),
    storage: Optional[str] = typer.Option(None, "--storage", help="where Tune and Train keep their state (shared storage on a multi-node cluster); default: --out"),
    reduction_factor: int = typer.Option(2, "--reduction-factor", help="quality: ASHA keeps 1/N of the trials at each rung"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue the unfinished trials of the sweep in this output directory"),
):
    """Search hyperparameters (quality: ASHA on val loss, writes best.yaml) or the fastest
    parallel plan (throughput: tokens/s per device, writes fastest.yaml) with Ray Tune."""
    from raygpt.tune.runner import SweepSpec, run_sweep

    if resume:
        spec = SweepSpec.load(resume)
        if address:
            spec.address = address
        outcome = run_sweep(spec, resume=True)
    else:
        spec = build_spec(config, preset, set_, space, mode, num_samples, out, address,
                          max_concurrent, search, steps, seed, storage, reduction_factor)
        outcome = run_sweep(spec)
    for name, path in outcome.files.items():
        typer.echo(f"{name}: {path}")
    if outcome.best_path is None:
        raise UserError("no trial produced a usable result (see the table above)")
