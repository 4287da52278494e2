"""Tune sweeps of Ray Train runs (Train V2 style).

Each Tune trial runs `_trial`, a function that builds and fits a `TorchTrainer`
(raygpt.train.launch.build_trainer); a `TuneReportCallback` in the trainer's RunConfig
carries every `ray.train.report` to Tune, where ASHA can stop the trial early.

Releasing a stopped trial's resources (ray-project/ray#54305): raygpt.tune.reaper.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raygpt.config import Config, ConfigError, validate
from raygpt.errors import UserError
from raygpt.files import write_atomic
from raygpt.tune.results import trial_values  # noqa: F401  (also imported from here)
from raygpt.tune.reaper import (REAPER_NAMESPACE, get_reaper, reap_callback, reaper_name,  # noqa: F401
                                 register_with_reaper, release)

logger = logging.getLogger("raygpt.tune")

SWEEP_FILE = "sweep.json"
EXPERIMENT = "tune"  # Tune's experiment directory inside --out
TRIALS = "trials"  # Train runs, one per trial id
# The trial actor is only a driver for its Train run: a sliver of memory, no CPU, so it
# never competes with Train workers for cores (Tune refuses an all-zero request).
TRIAL_ACTOR_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}
MODES = ("quality", "throughput")
SEARCHES = ("random", "optuna")


@dataclass
class SweepSpec:
    """Everything a sweep needs; saved as sweep.json so `--resume` rebuilds it."""

    mode: str
    base: dict  # the user's config (run.storage/run.name cleared)
    space: dict | None  # Space.to_dict(); None: the mode's default space
    out: str
    num_samples: int = 8
    search: str = "random"
    max_concurrent: int | None = None
    steps: int | None = None  # throughput: steps per measurement trial
    reduction_factor: int = 2
    seed: int | None = None
    address: str | None = None
    storage: str | None = None  # Tune + Train state; default: <out>

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    @property
    def storage_path(self) -> str:
        return self.storage or str(self.out_path)

    def save(self) -> None:
        p = self.out_path / SWEEP_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, out: str | os.PathLike) -> "SweepSpec":
        p = Path(out) / SWEEP_FILE
        if not p.is_file():
            raise UserError(f"--resume {str(out)!r}: no {SWEEP_FILE} there (not a raygpt tune output directory)")
        d = json.loads(p.read_text())
        spec = cls(**d)
        spec.out = str(Path(out).resolve())
        return spec


def throughput_overrides(cfg: Config, steps: int) -> dict[str, Any]:
    """Short measurement runs: the last log window (after warm-up) gives tokens/s."""
    return {"train.max_steps": steps, "train.log_every": max(1, steps // 2),
            "train.eval_every": steps, "train.eval_steps": 1, "checkpoint.every": 0,
            "optim.decay_steps": cfg.optim.decay_steps or cfg.train.max_steps,
            "run.max_failures": 0}


def _make_train_callbacks(trial_id: str, name: str):
    """Train-side callbacks, built inside the trial (TuneReportCallback needs its session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _TuneReport(TuneReportCallback):
        """Train's `done` would make Tune stop the trial on its final report, while the
        worker still writes its summary: pass it on as `finished`."""

        def after_report(self, run_context, metrics, checkpoint):
            m = [dict(x) for x in metrics]
            m[0]["finished"] = bool(m[0].pop("done", False))
            super().after_report(run_context, m, checkpoint)

    return [_TuneReport(), register_with_reaper(trial_id, name)]


# ---------------------------------------------------------------- the trial


def _is_oom(text: str) -> bool:
    t = text.lower()
    return any(s in t for s in ("out of memory", "outofmemory", "low on memory", "oom"))


def _first_line(e: BaseException) -> str:
    """The innermost useful message of a (Train) error, one line."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Train's WorkerGroupError text ends with the worker's traceback: the last line is the error.
    cand = lines[-1] if lines else type(e).__name__
    return cand[:300]


def _infeasible(reason: str, **extra) -> None:
    import ray.tune

    ray.tune.report({"infeasible": True, "reason": reason, "step": 0, "val_loss": math.inf,
                     "tokens_per_s": 0.0, "finished": False, **extra})


def _trial(config: dict, ctx: dict) -> None:
    """One Tune trial: build the trial's config, refuse it if infeasible, else fit a
    TorchTrainer whose reports reach Tune."""
    import ray
    import ray.tune

    from raygpt.train.launch import build_trainer
    from raygpt.tune.planner import Cluster, infeasible_reason, per_worker_resources
    from raygpt.tune.space import apply_params

    trial_id = ray.tune.get_context().get_trial_id()
    values = {**trial_values(config), **ctx["trial_overrides"]}
    cluster = Cluster(ctx["cluster"], ctx["use_gpu"])
    try:
        cfg = validate(apply_params(ctx["base"], values))
        reason = infeasible_reason(cfg, cluster, ctx["mode"], ctx.get("vocab_size"))
    except (ConfigError, UserError) as e:
        cfg, reason = None, str(e)
    if reason:
        print(f"raygpt tune: trial {trial_id} is infeasible: {reason}", flush=True)
        _infeasible(reason)
        return

    from raygpt.train.launch import RunPaths

    paths = RunPaths.resolve(ctx["train_storage"], trial_id, staging_name=f"tune-{trial_id}")
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    from raygpt.config import dump_config

    dump_config(cfg, paths.run_dir / "config.yaml")
    per_worker = per_worker_resources(cfg, ctx["use_gpu"])
    trainer = build_trainer(cfg, paths=paths, data_dir=ctx["data_dir"], use_gpu=ctx["use_gpu"],
                            per_worker=per_worker, callbacks=_make_train_callbacks(trial_id, ctx["reaper"]))
    try:
        trainer.fit()
    except Exception as e:
        try:
            reaper = ray.get_actor(ctx["reaper"], namespace=REAPER_NAMESPACE)
            reaped = ray.get(reaper.was_reaped.remote(trial_id), timeout=10)
        except Exception:
            reaped = False
        if reaped:  # stopped by Tune: its controller was killed on purpose
            return
        line = _first_line(e)
        if _is_oom(f"{type(e).__name__} {e}"):
            _infeasible(f"out of memory: {line}")
            return
        if ctx["mode"] == "throughput":
            _infeasible(f"failed: {line}")
            return
        raise


# ---------------------------------------------------------------- the driver


def _trial_dirname(trial) -> str:
    return trial.trial_id


@dataclass
class SweepOutcome:
    spec: SweepSpec
    rows: list[dict] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    best_path: str | None = None
    best_row: dict | None = None
    files: dict[str, str] = field(default_factory=dict)


def _cluster(spec: SweepSpec, base_cfg: Config):
    import ray

    from raygpt.tune.planner import Cluster

    from raygpt.train.capacity import read_capacity

    # Trials are sized against what the cluster can become: nodes up now plus what the
    # autoscaler may add (a trial's placement group is the demand that brings them).
    cap = read_capacity()
    totals = cap.eventual_totals() if cap.autoscaling else ray.cluster_resources()
    total = {k: float(v) for k, v in totals.items()
             if k in ("CPU", "GPU", "memory") or k in base_cfg.run.resources_per_worker}
    use_gpu = base_cfg.run.use_gpu if base_cfg.run.use_gpu is not None else total.get("GPU", 0) > 0
    if use_gpu and total.get("GPU", 0) <= 0:
        raise UserError("run.use_gpu is true but the Ray cluster has no GPU and no autoscaler node type with GPUs")
    return Cluster(total, bool(use_gpu))


def _plan_trials(spec: SweepSpec, space, base_cfg: Config, cluster, vocab_size: int | None = None):
    """-> (param_space, pre-decided rows, resource needs of the trials that will run)."""
    from raygpt.tune.planner import candidate_configs, infeasible_reason, plan_description, plan_key, trial_resources
    from raygpt.tune.space import trial_config

    base = spec.base
    if spec.mode == "throughput":
        if not space.is_discrete:
            cont = [p.key for p in space.params if p.kind in ("loguniform", "uniform")]
            raise ConfigError(f"throughput mode measures a finite set of configurations: "
                              f"{', '.join(cont)} must be a choice or grid")
        pre, runs, needs, seen = [], [], [], {}
        for i, (values, cfg, err) in enumerate(candidate_configs(base, space)):
            row = {"config_id": i, **values}
            reason = err or infeasible_reason(cfg, cluster, "throughput", vocab_size)
            if reason:
                pre.append({**row, "status": "infeasible", "reason": reason})
                continue
            key = plan_key(cfg, cluster)
            if key in seen:
                pre.append({**row, "status": "duplicate", "plan": plan_description(cfg, cluster),
                            "reason": f"runs the same as config {seen[key]}"})
                continue
            seen[key] = i
            runs.append({"config_id": i, **values})
            needs.append(trial_resources(cfg, cluster.use_gpu))
        from ray import tune

        param_space = {"plan": tune.grid_search(runs)} if runs else None
        return param_space, pre, needs

    # quality: every value a discrete parameter may take bounds the trial sizes
    needs = []
    nw = space.get("run.num_workers")
    for w in (nw.values() if nw else [base_cfg.run.num_workers]):
        try:
            cfg = trial_config(base, {**space.constants, "run.num_workers": w})
        except ConfigError:
            continue
        needs.append(trial_resources(cfg, cluster.use_gpu))
    return space.to_tune(), [], needs


def _scheduler(spec: SweepSpec, base_cfg: Config):
    if spec.mode != "quality":
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = base_cfg.train.eval_every
    max_t = base_cfg.train.max_steps - 1  # the last rung stays below the final step
    if grace > max_t:
        print(f"raygpt tune: train.eval_every={grace} leaves no evaluation before the last "
              f"step ({base_cfg.train.max_steps}): no early stopping", flush=True)
        return None
    return ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=max_t,
                         grace_period=grace, reduction_factor=spec.reduction_factor,
                         stop_last_trials=False)


def _search_alg(spec: SweepSpec, space, concurrent: int):
    """-> (search algorithm, max_concurrent_trials for TuneConfig). Tune ignores
    max_concurrent_trials for a BasicVariantGenerator instance: it takes the limit itself."""
    from ray.tune.search import BasicVariantGenerator

    if spec.mode == "throughput" or spec.search == "random":
        return BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed), None
    if spec.search == "optuna":
        if any(p.kind == "grid" for p in space.params):
            raise ConfigError("--search optuna samples every parameter: use choice instead of grid")
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("--search optuna needs the optuna package (pip install optuna)") from None
        return OptunaSearch(metric="val_loss", mode="min", seed=spec.seed), concurrent
    raise UserError(f"--search {spec.search!r}: expected one of {', '.join(SEARCHES)}")


def run_sweep(spec: SweepSpec, resume: bool = False) -> SweepOutcome:
    """Run (or resume) a sweep; writes results into spec.out and returns them."""
    import ray
    from ray import tune

    from raygpt.data.prepare import ensure_data
    from raygpt.train.launch import init_ray, resolve_local_storage
    from raygpt.tune import results as res
    from raygpt.tune.space import parse_space

    if spec.mode not in MODES:
        raise UserError(f"--mode {spec.mode!r}: expected quality or throughput")
    base_cfg = validate(spec.base)
    out = spec.out_path
    storage = spec.storage_path.rstrip("/")  # a local path or a URI (s3://...)
    exp_dir = f"{storage}/{EXPERIMENT}"
    exists = tune.Tuner.can_restore(exp_dir)
    if resume:
        if not exists:
            raise UserError(f"--resume {spec.out}: no Tune experiment in {exp_dir}")
    elif exists:
        raise UserError(f"--out {spec.out} already holds a sweep: use --resume {spec.out} to "
                        f"continue it, or another --out")
    resolve_local_storage(str(out))
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # checkpoint-only reports

    started = init_ray(spec.address)
    try:
        cluster = _cluster(spec, base_cfg)
        if spec.space is None:  # the mode's default space, sized to this cluster
            from raygpt.tune.space import default_space

            devices = cluster.gpus if cluster.use_gpu else cluster.cpus
            per = base_cfg.run.gpus_per_worker if cluster.use_gpu else (base_cfg.run.cpus_per_worker or 1)
            spec.space = default_space(spec.mode, base_cfg, int(devices // per)).to_dict()
        space = parse_space(spec.space, "<sweep>")
        data_dir = str(ensure_data(base_cfg.data))
        from raygpt.data.prepare import read_meta

        vocab_size = read_meta(data_dir)["vocab_size"]
        param_space, pre_rows, needs = _plan_trials(spec, space, base_cfg, cluster, vocab_size)
        from raygpt.tune.planner import max_concurrent

        concurrent = max_concurrent(needs, cluster, spec.max_concurrent)
        # Search algorithm first: a space it cannot take fails before anything is written.
        search_alg, limit = (None, None) if resume else _search_alg(spec, space, concurrent)
        spec.save()
        outcome = SweepOutcome(spec)
        if param_space is None:  # throughput: nothing feasible to measure
            outcome.rows = pre_rows
            res.finish(outcome, base_cfg, cluster)
            return outcome

        get_reaper(create=True)
        trial_overrides = throughput_overrides(base_cfg, spec.steps or 10) if spec.mode == "throughput" else {}
        ctx = {"base": spec.base, "mode": spec.mode, "cluster": cluster.resources,
               "use_gpu": cluster.use_gpu, "data_dir": data_dir, "vocab_size": vocab_size,
               "train_storage": f"{storage}/{TRIALS}", "reaper": reaper_name(),
               "trial_overrides": trial_overrides}
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), TRIAL_ACTOR_RESOURCES)
        print(f"raygpt tune: {spec.mode} sweep -> {out} | up to {concurrent} trial(s) at once "
              f"on {cluster.cpus:g} CPU / {cluster.gpus:g} GPU"
              + (" (resuming)" if resume else ""), flush=True)
        if resume:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    num_samples=1 if spec.mode == "throughput" else spec.num_samples,
                    search_alg=search_alg,
                    scheduler=_scheduler(spec, base_cfg),
                    max_concurrent_trials=limit,
                    reuse_actors=False,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=spec.storage_path,
                    # RAYGPT_TUNE_REAPER=0 turns the #54305 workaround off (to see the bug).
                    callbacks=[reap_callback()] if os.environ.get("RAYGPT_TUNE_REAPER", "1") != "0" else [],
                    failure_config=tune.FailureConfig(max_failures=0),
                    verbose=int(os.environ.get("RAYGPT_TUNE_VERBOSE", "1")),
                ),
            )
        grid = tuner.fit()
        outcome.rows, outcome.curves = res.collect(grid, spec, base_cfg, cluster, space)
        outcome.rows = pre_rows + outcome.rows
        res.finish(outcome, base_cfg, cluster)
        return outcome
    finally:
        if started:
            ray.shutdown()
