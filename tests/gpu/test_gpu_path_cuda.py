"""GPU-only halves of the GPU-path checks (the CPU halves: tests/unit/test_gpu_path.py and
test_parallel_math.py). Skipped without CUDA; no Ray here."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _model(n_layer=2):
    from raygpt.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=64, block_size=32, vocab_size=128, bias=True)).cuda()


def _batch(b=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (b, 32), generator=g).cuda()
    return x, torch.roll(x, -1, 1)


def test_clip_grad_norm_makes_no_host_sync():
    from raygpt.train.loop import clip_grad_norm

    model = _model()
    x, y = _batch()
    model(x, y)[1].backward()
    ref = [p.grad.clone() for p in model.parameters()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = clip_grad_norm(list(model.parameters()), 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expect = torch.nn.utils.get_total_norm(ref)  # torch's own (value equality under FSDP/TP: CPU tests)
    assert abs(float(norm) - float(expect)) < 1e-4 * float(expect)


def test_fused_adamw_on_gpu_groups():
    from raygpt.config import OptimConfig
    from raygpt.train.loop import build_optimizer

    opt = build_optimizer(_model(), OptimConfig(), "cuda")
    assert all(g["fused"] for g in opt.param_groups)


def test_whole_model_compile_bf16_matches_eager():
    from raygpt.config import ParallelConfig
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import ParallelPlan

    x, y = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, ref = _model()(x, y)
        m = parallelize(_model(), ParallelPlan(1, "none"), None, ParallelConfig(compile=True), torch.device("cuda"))
        _, loss = m(x, y, return_logits=False)
    assert abs(loss.item() - ref.item()) < 2e-2


def test_profiler_writes_trace_and_memory_snapshot(tmp_path):
    from raygpt.config import OptimConfig
    from raygpt.train.loop import build_optimizer, train_step
    from raygpt.train.profiling import StepProfiler

    model = _model()
    opt = build_optimizer(model, OptimConfig(), "cuda")
    prof = StepProfiler(tmp_path, 0, "1:2", "cuda")
    for step in range(4):
        prof.step(step)
        train_step(model, opt, [_batch()], torch.device("cuda"), torch.bfloat16, 1.0)
    prof.close()
    trace = json.loads((tmp_path / "profile" / "rank0.pt.trace.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])  # GPU kernels recorded
    assert (tmp_path / "profile" / "rank0.memory.pickle").stat().st_size > 0


@pytest.mark.parametrize("backend,op", [("cudnn", "cudnn_attention"), ("flash", "flash_attention")])
def test_attention_backend_runs_its_kernel_with_the_same_loss(backend, op):
    """parallel.attention puts its SDPA kernel first: the profiler sees that aten op in
    forward and backward, and the bf16 loss matches the math kernel's."""
    from torch.profiler import ProfilerActivity, profile

    from raygpt.parallel.apply import set_attention_backend

    x, y = _batch()
    model = _model()
    try:
        set_attention_backend("math")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = model(x, y)[1].item()
        set_attention_backend(backend)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, y)[1]
            loss.backward()
    finally:
        set_attention_backend("auto")
    names = {e.key for e in prof.key_averages()}
    assert any(op in n and "backward" not in n for n in names), sorted(n for n in names if "attention" in n)
    assert any(op in n and "backward" in n for n in names), sorted(n for n in names if "attention" in n)
    assert abs(loss.item() - ref) < 2e-2


def test_process_mode_staging_is_pinned_shared_and_round_trips(tmp_path):
    """checkpoint.async_mode=process on GPU: staging buffers in shared memory *and* pinned
    (cudaHostRegister), reused by the second save; the checkpoint process writes what
    the GPU held."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    from raygpt.train.staging import PinnedStager

    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        group = dist.new_group(backend="gloo")
        w = torch.randn(256, 64, device="cuda")
        stager = PinnedStager(pin=True, shared=True)
        for i in range(2):
            staged = stager.stage({"w": w})
            assert staged["w"].is_pinned() and staged["w"].is_shared()
            fut = dcp.async_save({"w": w}, checkpoint_id=str(tmp_path / f"c{i}"), process_group=group,
                                 async_stager=stager, async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            fut.result()
            back = {"w": torch.zeros(256, 64)}
            dcp.load(back, checkpoint_id=str(tmp_path / f"c{i}"))
            assert torch.equal(back["w"], w.cpu())
            w.add_(1.0)
        assert stager.allocations == 1  # the second save reused the first's buffer
        bigger = stager.stage({"w": torch.randn(512, 64, device="cuda")})["w"]  # re-registered
        assert stager.allocations == 2 and bigger.is_pinned() and len(stager._registered) == 1
        stager.close()
        assert not stager._registered
    finally:
        if own:
            dist.destroy_process_group()
