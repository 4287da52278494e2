"""Collective math of the GPU path, on CPU with gloo (no Ray: the ranks are processes
started here, the collectives are the real ones).

- clip_grad_norm equals torch's clip_grad_norm_ (on the gathered full gradients) to
  1e-6 under FSDP, TP (with biases) and a pipeline, in one all-reduce;
- fused AdamW steps a TP model with biases (groups that would mix DTensor and plain
  tensors are split);
- a pipeline without FSDP runs its stages under autocast;
- FSDP under a pipeline gathers each stage's weights once per step, not per microbatch.
"""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp




def _entry(rank, world, port, scenario, errfile):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        globals()[scenario](rank, world)
        with open(f"{errfile}.done.{rank}", "w") as f:  # this rank's checks all passed
            f.write("ok")
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world, scenario, tmp_path) -> int:
    """Run `scenario` (its asserts) on `world` gloo ranks; -> how many ranks passed."""
    from conftest import free_port

    err = str(tmp_path / "err")
    failure = None
    try:
        mp.spawn(_entry, args=(world, free_port(), scenario, err), nprocs=world, join=True)
    except Exception as e:
        msgs = [open(os.path.join(tmp_path, f)).read() for f in sorted(os.listdir(tmp_path))
                if f.startswith("err.") and not f.startswith("err.done.")]
        failure = "\n".join(msgs) or f"a rank failed: {e}"
    assert failure is None, failure
    return sum(1 for f in os.listdir(tmp_path) if f.startswith("err.done."))


def _model(n_layer=2, bias=True):
    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=32, block_size=16, vocab_size=61, bias=bias))


def _batch(b=4, t=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 61, (b, t), generator=g)
    return x, torch.roll(x, -1, 1)


def _pcfg(**kw):
    from raygpt.config import ParallelConfig

    return ParallelConfig(**kw)


def _full(t):
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _check_clip(params, max_norm, pp_group=None, skip=frozenset(), extra_ref=None):
    """Ours on the live (sharded) grads vs torch's clip_grad_norm_ on full copies."""
    from torch.distributed.tensor.debug import CommDebugMode

    from raygpt.train.loop import clip_grad_norm

    params = [p for p in params if p.grad is not None]
    refs = []
    for p in params:
        if id(p) in skip:
            continue
        q = torch.nn.Parameter(_full(p.detach()).clone())
        q.grad = _full(p.grad).clone()
        refs.append(q)
    refs += extra_ref or []
    ref_norm = torch.nn.utils.clip_grad_norm_(refs, max_norm)
    with CommDebugMode() as comm:
        norm = clip_grad_norm(params, max_norm, pp_group=pp_group, skip=set(skip))
    n_coll = comm.get_total_counts()
    assert abs(float(norm) - float(ref_norm)) <= 1e-6 * max(1.0, float(ref_norm)), (float(norm), float(ref_norm))
    assert float(ref_norm) > max_norm  # the clip really scaled
    got = [_full(p.grad) for p in params if id(p) not in skip]
    for g, r in zip(got, refs):
        torch.testing.assert_close(g, r.grad, atol=1e-6, rtol=1e-6)
    return n_coll


# ---------------------------------------------------------------- scenarios (run per rank)

def fsdp_tp_clip_and_fused(rank, world):
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train.loop import build_optimizer

    x, y = _batch()
    for strategy in ("fsdp", "tp"):
        pcfg = _pcfg(strategy=strategy)
        plan = resolve_plan(pcfg, world, n_heads=4)
        model = parallelize(_model(), plan, plan.build_mesh("cpu"), pcfg, torch.device("cpu"))
        # q/k/v run as one matmul except under TP, whose sharded weights stay separate.
        assert all(b.attn.fuse_qkv == (strategy != "tp") for b in model.blocks.values()), strategy
        dp = plan.dp_rank(rank)
        xs, ys = (x, y) if plan.dp == 1 else (x.chunk(plan.dp)[dp], y.chunk(plan.dp)[dp])
        _, loss = model(xs, ys)
        if strategy == "tp":  # every rank sees the whole batch: the unsharded model's loss
            _, ref = _model()(xs, ys)
            assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
        loss.backward()
        n = _check_clip(list(model.parameters()), max_norm=0.05)
        assert n == 1, f"{strategy}: {n} collectives in clip_grad_norm, expected one all-reduce"

        # Fused AdamW over a TP model with biases: DTensor weights and plain biases/norms.
        from raygpt.config import OptimConfig

        opt = build_optimizer(model, OptimConfig(), "cpu", fused=True)
        for g in opt.param_groups:
            kinds = {type(p).__name__ == "DTensor" for p in g["params"]}
            assert len(kinds) == 1 and g["fused"], (strategy, kinds, g["fused"])
        if strategy == "tp":
            assert {type(p).__name__ for g in opt.param_groups for p in g["params"]} == {"DTensor", "Parameter"}
        before = [_full(p.detach()).clone() for p in model.parameters()]
        opt.step()
        assert all(not torch.equal(b, _full(p.detach())) for b, p in zip(before, model.parameters()))


def pipeline_autocast_and_clip(rank, world):
    import torch.distributed as dist

    from raygpt.parallel.pipeline import Pipeline
    from raygpt.parallel.plan import resolve_plan

    pcfg = _pcfg(pp_degree=2, pp_schedule="1f1b")
    plan = resolve_plan(pcfg, world, n_heads=4)
    assert plan.pp == 2 and plan.dp == 1
    x, y = _batch()
    ref = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_loss = ref(x, y)

    pipe = Pipeline(_model(), plan, plan.build_mesh("cpu"), pcfg, torch.device("cpu"), n_microbatches=2,
                    amp_dtype=torch.bfloat16)
    seen = set()
    for part in pipe.parts:
        for block in part.blocks.values():
            block.mlp.c_fc.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    loss = pipe.forward_backward(x, y, torch.device("cpu"))
    assert seen == {torch.bfloat16}, seen
    if pipe.has_last:  # bf16 autocast, same math as the unpipelined model's
        assert abs(float(loss) - float(ref_loss)) < 2e-2, (float(loss), float(ref_loss))

    # Clip over stages: the reference holds every stage's grads (gathered), tied matrix once.
    mine = [(n, _full(p.grad).clone()) for part in pipe.parts for n, p in part.named_parameters()
            if p.grad is not None and id(p) not in pipe.tied_duplicate()]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    others = []
    for r, items in enumerate(gathered):
        if r == rank:
            continue
        for _, g in items:
            q = torch.nn.Parameter(torch.zeros_like(g))
            q.grad = g
            others.append(q)
    n = _check_clip(list(pipe.parameters()), 0.05, pp_group=pipe.pp_group, skip=pipe.tied_duplicate(),
                    extra_ref=others)
    assert n == 1, n


def pipeline_fsdp_gathers_once(rank, world):
    import torch.distributed as dist

    from raygpt.parallel.pipeline import Pipeline
    from raygpt.parallel.plan import resolve_plan

    pcfg = _pcfg(pp_degree=2, strategy="fsdp")
    plan = resolve_plan(pcfg, world, n_heads=4)
    assert plan.pp == 2 and plan.shard == 2
    pipe = Pipeline(_model(n_layer=4), plan, plan.build_mesh("cpu"), pcfg, torch.device("cpu"), n_microbatches=4)
    x, y = _batch(b=8)
    x, y = x.chunk(2)[plan.dp_rank(rank)], y.chunk(2)[plan.dp_rank(rank)]
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    orig = getattr(dist, name)
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    pipe.forward_backward(x, y, torch.device("cpu"))  # first step: shape inference too
    setattr(dist, name, counting)
    try:
        pipe.forward_backward(x, y, torch.device("cpu"))
    finally:
        setattr(dist, name, orig)
    units = 3  # per stage: two blocks + the stage root, each one FSDP unit
    assert len(calls) == units, f"{len(calls)} all-gathers for 4 microbatches, expected {units} (once per step)"


# ---------------------------------------------------------------- tests

@pytest.mark.timeout(300)
def test_clip_equals_torch_and_fused_adamw_under_fsdp_and_tp(tmp_path):
    assert _spawn(2, "fsdp_tp_clip_and_fused", tmp_path) == 2


@pytest.mark.timeout(300)
def test_pipeline_autocast_and_clip_over_stages(tmp_path):
    assert _spawn(2, "pipeline_autocast_and_clip", tmp_path) == 2


@pytest.mark.timeout(300)
def test_fsdp_under_pipeline_gathers_weights_once_per_step(tmp_path):
    assert _spawn(4, "pipeline_fsdp_gathers_once", tmp_path) == 4


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
