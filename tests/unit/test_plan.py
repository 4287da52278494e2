import pytest

from raygpt.config import load_config
from raygpt.errors import UserError
from raygpt.parallel.plan import ParallelPlan, PlanError, resolve_plan
from raygpt.train.loop import batch_geometry, lr_at, pick_micro_batch


def pc(**kw):
    from raygpt.config import ParallelConfig

    return ParallelConfig(**kw)


def test_resolve_strategies():
    assert resolve_plan(pc(strategy="auto"), 1).strategy == "none"
    assert resolve_plan(pc(strategy="auto"), 4) == ParallelPlan(4, "ddp", replicate=4)
    assert resolve_plan(pc(strategy="fsdp"), 4) == ParallelPlan(4, "fsdp", shard=4)
    assert resolve_plan(pc(strategy="hsdp", shard_degree=2), 8) == ParallelPlan(8, "hsdp", replicate=4, shard=2)
    assert resolve_plan(pc(strategy="tp"), 2) == ParallelPlan(2, "tp", tp=2)
    p = resolve_plan(pc(strategy="tp", tp_degree=2), 4)
    assert (p.tp, p.shard, p.dp, p.dp_rank(3)) == (2, 2, 2, 1)
    # ddp/fsdp on one rank: no wrapper (an elastic run that shrank to 1)
    assert resolve_plan(pc(strategy="fsdp"), 1).strategy == "none"
    # auto on a GPU whose memory the model states would crowd: fsdp
    assert resolve_plan(pc(strategy="auto"), 2, n_params=10**9, device_memory=16 * 2**30, on_gpu=True).strategy == "fsdp"


def test_bad_plans_print_every_factor():
    with pytest.raises(PlanError, match=r"replicate=2 x shard=2 x tp=2 = 8, but the world size is 4"):
        ParallelPlan(4, "hsdp", replicate=2, shard=2, tp=2)
    with pytest.raises(PlanError, match="tp_degree=3 does not divide the world size 4"):
        resolve_plan(pc(strategy="tp", tp_degree=3), 4, n_heads=6)
    with pytest.raises(PlanError, match="shard_degree=3 does not divide"):
        resolve_plan(pc(strategy="hsdp", shard_degree=3), 4)
    with pytest.raises(PlanError, match="strategy=none runs on exactly 1 worker"):
        resolve_plan(pc(strategy="none"), 2)
    with pytest.raises(PlanError, match="cannot be combined"):
        resolve_plan(pc(strategy="ddp", tp_degree=2), 4)


def test_batch_geometry_keeps_global_batch():
    assert batch_geometry(12, 1, 12) == (12, 12, 1)
    assert batch_geometry(12, 2, 12) == (6, 6, 1)
    assert batch_geometry(8, 1, 4) == (8, 4, 2)
    assert batch_geometry(8, 2, 4) == (4, 4, 1)
    assert pick_micro_batch(6, 4) == 3
    with pytest.raises(UserError, match="global_batch=12 is not divisible by the data-parallel size 5"):
        batch_geometry(12, 5, 4)


def test_lr_schedule():
    assert lr_at(0, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-3 / 101)
    assert lr_at(100, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-3)
    assert lr_at(2000, 1e-3, 1e-4, 100, 2000) == pytest.approx(1e-4)
    assert lr_at(5000, 1e-3, 1e-4, 100, 2000) == 1e-4
    mid = lr_at(1050, 1e-3, 1e-4, 100, 2000)
    assert mid == pytest.approx(1e-4 + 0.5 * 9e-4)


def test_driver_checks_every_elastic_world_size():
    from raygpt.parallel.plan import PlanError
    from raygpt.train.launch import check_plans

    ok = load_config("debug", overrides=["run.num_workers=4", "run.min_workers=1", "train.global_batch=12",
                                         "train.micro_batch=4"])
    check_plans(ok, 65, use_gpu=False)
    bad = load_config("debug", overrides=["run.num_workers=3", "run.min_workers=1"])  # global batch 8
    with pytest.raises(UserError, match="global_batch=8 is not divisible by the data-parallel size 3.*elastic range 1:3"):
        check_plans(bad, 65, use_gpu=False)
    hsdp = load_config("debug", overrides=["run.num_workers=2", "parallel.strategy=hsdp", "parallel.shard_degree=3"])
    with pytest.raises(PlanError, match="shard_degree=3"):
        check_plans(hsdp, 65, use_gpu=False)


def test_pipeline_plans_and_errors():
    from raygpt.config import ConfigError, ParallelConfig
    from raygpt.parallel.pipeline import stage_layers
    from raygpt.train.launch import check_plans

    p = resolve_plan(ParallelConfig(pp_degree=2, strategy="fsdp"), 4)
    assert (p.pp, p.shard, p.pp_rank(3), p.dp_rank(3)) == (2, 2, 1, 1)
    assert [list(r) for r in stage_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    with pytest.raises(ConfigError, match="pp_degree=3 .* larger than model.n_layer=2"):
        load_config("debug", overrides=["parallel.pp_degree=3"])
    with pytest.raises(ConfigError, match="4 stages with pp_schedule=interleaved.*n_layer=2"):
        load_config("debug", overrides=["parallel.pp_degree=2", "parallel.pp_schedule=interleaved"])
    with pytest.raises(PlanError, match="pp_degree=2 does not divide the world size 3"):
        resolve_plan(ParallelConfig(pp_degree=2), 3)
    with pytest.raises(PlanError, match="ddp cannot be combined"):
        resolve_plan(ParallelConfig(pp_degree=2, strategy="ddp"), 4)
    bad_mb = load_config("debug", overrides=["run.num_workers=2", "parallel.pp_degree=2", "train.pp_microbatches=3"])
    with pytest.raises(UserError, match="pp_microbatches=3 does not divide the per-rank batch 8"):
        check_plans(bad_mb, 65, use_gpu=False)
