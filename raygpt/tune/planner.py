"""Feasibility and resources of a trial, decided before it starts (no Ray import).

A configuration is infeasible when it can never run here: more workers than the
cluster can place, a parallel plan that does not fit the world size, a global batch
the data-parallel ranks cannot split. In throughput mode a micro batch that the worker
would silently lower (it does not divide the per-rank batch) is infeasible too: it
would measure another configuration. Out-of-memory is only known at run time; the
trial records it the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raygpt.config import Config, ConfigError


@dataclass(frozen=True)
class Cluster:
    """What the sweep can use: total logical resources of the Ray cluster."""

    resources: dict[str, float]
    use_gpu: bool = False

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)


def per_worker_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """Resources of one Train worker in a sweep: run.cpus_per_worker (1 if unset: trials
    share the machine), a GPU each on GPU clusters, plus run.resources_per_worker."""
    res = {"CPU": float(cfg.run.cpus_per_worker or 1.0), **cfg.run.resources_per_worker}
    if use_gpu:
        res["GPU"] = float(cfg.run.gpus_per_worker)
    return res


def trial_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    per = per_worker_resources(cfg, use_gpu)
    return {k: v * cfg.run.num_workers for k, v in per.items()}


def infeasible_reason(cfg: Config, cluster: Cluster, mode: str = "quality",
                      vocab_size: int | None = None) -> str | None:
    """Why this configuration cannot run on this cluster, or None."""
    from raygpt.errors import UserError
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.launch import check_plans
    from raygpt.train.loop import batch_geometry, pick_micro_batch

    n = cfg.run.num_workers
    for key, need in trial_resources(cfg, cluster.use_gpu).items():
        have = cluster.resources.get(key, 0.0)
        if need > have + 1e-9:
            per = need / n
            return (f"run.num_workers={n} needs {need:g} {key} ({per:g} per worker) "
                    f"but the cluster has {have:g}")
    try:
        # the training driver's own checks (plan for every world size, batch split, pipeline)
        check_plans(cfg, vocab_size or cfg.model.vocab_size or 256, cluster.use_gpu)
        plan = resolve_plan(cfg.parallel, n, n_heads=cfg.model.n_head, on_gpu=cluster.use_gpu)
        per_rank, micro, _ = batch_geometry(cfg.train.global_batch, plan.dp, cfg.train.micro_batch)
    except UserError as e:
        return str(e)
    if mode == "throughput" and micro != cfg.train.micro_batch:
        return (f"train.micro_batch={cfg.train.micro_batch} does not divide the per-rank batch "
                f"{per_rank} (train.global_batch={cfg.train.global_batch} over {plan.dp} "
                f"data-parallel ranks): it would run as micro batch "
                f"{pick_micro_batch(per_rank, cfg.train.micro_batch)}")
    return None


def plan_key(cfg: Config, cluster: Cluster) -> tuple:
    """What a throughput trial actually measures: two configurations with the same key
    run the same code (e.g. ddp and fsdp on one worker both run the plain model)."""
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.loop import batch_geometry

    plan = resolve_plan(cfg.parallel, cfg.run.num_workers, n_heads=cfg.model.n_head,
                        on_gpu=cluster.use_gpu)
    _, micro, accum = batch_geometry(cfg.train.global_batch, plan.dp, cfg.train.micro_batch)
    d = cfg.to_dict()
    for k in ("strategy", "shard_degree", "tp_degree"):
        d["parallel"].pop(k, None)
    d["train"].pop("micro_batch", None)
    d["run"].pop("num_workers", None)
    return (plan.describe(), micro, accum, repr(d))


def plan_description(cfg: Config, cluster: Cluster) -> str:
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.loop import batch_geometry

    plan = resolve_plan(cfg.parallel, cfg.run.num_workers, n_heads=cfg.model.n_head,
                        on_gpu=cluster.use_gpu)
    _, micro, accum = batch_geometry(cfg.train.global_batch, plan.dp, cfg.train.micro_batch)
    return f"{plan.describe()} micro={micro} accum={accum}"


def max_concurrent(trial_needs: list[dict[str, float]], cluster: Cluster,
                   user_limit: int | None = None) -> int:
    """How many trials can hold their Train workers at once: the cluster's resources over
    the largest feasible trial's (Train starts a run only when all its workers fit, so
    more concurrent trials would just wait, see the Ray Train + Tune guide)."""
    fits = [t for t in trial_needs
            if all(v <= cluster.resources.get(k, 0.0) + 1e-9 for k, v in t.items())]
    if not fits:
        n = 1
    else:
        n = None
        for key in {k for t in fits for k in t}:
            need = max(t.get(key, 0.0) for t in fits)
            if need <= 0:
                continue
            k = int(math.floor(cluster.resources.get(key, 0.0) / need + 1e-9))
            n = k if n is None else min(n, k)
        n = max(1, n or 1)
    if user_limit:
        n = min(n, user_limit)
    return max(1, n)


def candidate_configs(base: dict, space, limit: int = 4096) -> list[tuple[dict[str, Any], Config | None, str | None]]:
    """Every combination of a discrete space as (values, config or None, config error)."""
    from raygpt.tune.space import trial_config

    out = []
    combos = space.combinations()
    if len(combos) > limit:
        raise ConfigError(f"search space {space.source} has {len(combos)} combinations "
                          f"(more than {limit}): narrow it")
    for values in combos:
        try:
            out.append((values, trial_config(base, values), None))
        except ConfigError as e:
            out.append((values, None, str(e)))
    return out
