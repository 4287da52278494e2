"""GPU-path pieces that run on CPU: profiler traces, whole-model compile, the MFU peak
table, and bench/train_throughput's short runs. (Collective math: test_parallel_math.py.)"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raygpt.config import ParallelConfig, load_config
from raygpt.model.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]


def _tiny(seed=0, n_layer=2, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=40, **kw))


def _batch(seed=1, b=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 40, (b, 16), generator=g)
    return x, torch.roll(x, -1, 1)


# ---------------------------------------------------------------- profiling

def test_step_profiler_writes_a_trace_that_parses(tmp_path):
    from raygpt.train.loop import build_optimizer, train_step
    from raygpt.train.profiling import StepProfiler

    model = _tiny()
    opt = build_optimizer(model, load_config("debug").optim, "cpu")
    prof = StepProfiler(tmp_path, rank=3, spec="2:3", device="cpu")
    for step in range(8):
        prof.step(step)
        assert prof.active == (2 <= step < 5)
        train_step(model, opt, [_batch(step)], torch.device("cpu"), None, 1.0)
    prof.close()
    trace = tmp_path / "profile" / "rank3.pt.trace.json"
    assert prof.files == [trace]
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::") for n in names)  # operators were recorded
    steps = sorted(n for n in names if n.startswith("ProfilerStep#"))
    assert len(steps) == 3, steps  # steps 2, 3, 4 and no others
    assert not list((tmp_path / "profile").glob(".*"))  # no temp file left


def test_step_profiler_closes_a_window_cut_short_and_is_off_without_spec(tmp_path):
    from raygpt.train.profiling import StepProfiler

    off = StepProfiler(tmp_path / "off", 0, None)
    for s in range(3):
        off.step(s)
    off.close()
    assert not (tmp_path / "off").exists()
    cut = StepProfiler(tmp_path / "cut", 0, "1:100")
    for s in range(3):
        cut.step(s)
        torch.ones(8) @ torch.ones(8)
    cut.close()  # training ended inside the window: the trace is still written
    assert json.loads((tmp_path / "cut" / "profile" / "rank0.pt.trace.json").read_text())["traceEvents"]


def test_profile_spec_parsing():
    from raygpt.config import ConfigError, parse_profile_spec

    assert parse_profile_spec("10:5") == (10, 5) and parse_profile_spec("0:1") == (0, 1)
    for bad in ("5", "a:b", "3:0", "-1:2", "1:2:3", ""):
        with pytest.raises(ValueError, match="START:COUNT"):
            parse_profile_spec(bad)
    with pytest.raises(ConfigError, match="quoted string"):  # YAML's base-60 reading of 5:3
        load_config("debug", overrides=["train.profile=5:3"])


@pytest.mark.parametrize("spec,ok", [("10:5", True), ("a:b", False), ("3:0", False)])
def test_profile_flag_is_validated(spec, ok, tmp_path):
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", "--preset", "debug", "--profile", spec,
                        "--print-config"], capture_output=True, text=True, cwd=tmp_path)
    if ok:
        assert r.returncode == 0, r.stderr
        assert f"profile: {spec}" in r.stdout or f"profile: '{spec}'" in r.stdout
    else:
        assert r.returncode == 2 and "train.profile" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------- compile

@pytest.mark.slow
def test_whole_model_compile_gives_the_eager_loss():
    """parallel.compile with compile_mode=model (the default on one rank): the model and
    its loss as one graph; loss and gradients match eager to 1e-4."""
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import ParallelPlan

    x, y = _batch()
    eager = _tiny(n_layer=1, bias=True)
    _, ref = eager(x, y)
    ref.backward()
    compiled = parallelize(_tiny(n_layer=1, bias=True), ParallelPlan(1, "none"), None, ParallelConfig(compile=True),
                           torch.device("cpu"))
    assert compiled._compiled_call_impl is not None  # the whole model, not its blocks
    assert all(b._compiled_call_impl is None for b in compiled.blocks.values())
    _, loss = compiled(x, y, return_logits=False)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    for (n, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints unchanged


def test_compile_mode_auto_picks_whole_model_on_one_rank_only():
    from raygpt.parallel.apply import compile_whole
    from raygpt.parallel.plan import ParallelPlan

    auto = ParallelConfig(compile=True)
    assert compile_whole(ParallelPlan(1, "none"), auto)
    assert not compile_whole(ParallelPlan(2, "ddp", replicate=2), auto)
    assert not compile_whole(ParallelPlan(2, "fsdp", shard=2), auto)
    assert not compile_whole(ParallelPlan(2, "tp", tp=2), auto)
    assert not compile_whole(ParallelPlan(2, "pp", pp=2), auto)
    assert not compile_whole(ParallelPlan(1, "none"), ParallelConfig(compile=True, compile_mode="blocks"))


# ---------------------------------------------------------------- attention kernels

@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_gives_the_separate_projections(bias):
    """fuse_qkv (one matmul over the concatenated weights) = three Linear layers: the same
    loss, the same gradients on wq/wk/wv, the same q, k and v."""
    x, y = _batch()
    fused, separate = _tiny(bias=bias), _tiny(bias=bias)
    for b in separate.blocks.values():
        b.attn.fuse_qkv = False
    assert all(b.attn.fuse_qkv for b in fused.blocks.values())  # the default
    _, lf = fused(x, y)
    _, ls = separate(x, y)
    lf.backward()
    ls.backward()
    assert abs(lf.item() - ls.item()) < 1e-6
    for (n, p), q in zip(fused.named_parameters(), separate.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
    attn_f, attn_s = fused.blocks["0"].attn, separate.blocks["0"].attn
    h = torch.randn(2, 5, 32)
    for a, b in zip(attn_f._qkv(h), attn_s._qkv(h)):
        assert a.shape == b.shape == (2, 2, 5, 16)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_attention_backend_is_tried_first_and_the_others_stay_as_fallbacks():
    from torch.nn.attention import SDPBackend

    from raygpt.parallel.apply import parallelize, set_attention_backend
    from raygpt.parallel.plan import ParallelPlan

    default = torch._C._get_sdp_priority_order()
    x, y = _batch()
    _, ref = _tiny()(x, y)
    try:
        set_attention_backend("cudnn")
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(default)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        set_attention_backend("efficient")  # a second choice replaces the first
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
        # Through parallelize (both training paths call it), on CPU: the loss is unchanged.
        model = parallelize(_tiny(), ParallelPlan(1, "none"), None, ParallelConfig(attention="math"),
                            torch.device("cpu"))
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.MATH)
        _, loss = model(x, y)
        assert abs(loss.item() - ref.item()) < 1e-5
    finally:
        set_attention_backend("auto")
    assert torch._C._get_sdp_priority_order() == default


def test_attention_and_inductor_mode_are_validated():
    from raygpt.config import load_config

    cfg = load_config("debug", overrides=["parallel.attention=cudnn", "parallel.inductor_mode=max-autotune-no-cudagraphs"])
    assert (cfg.parallel.attention, cfg.parallel.inductor_mode) == ("cudnn", "max-autotune-no-cudagraphs")
    for bad in ("parallel.attention=fa3", "parallel.inductor_mode=fast"):
        with pytest.raises(Exception, match=bad.split("=")[0].split(".")[1]):
            load_config("debug", overrides=[bad])


# ---------------------------------------------------------------- MFU peaks

def test_mfu_peak_by_exact_device_name(monkeypatch):
    from raygpt.train import metrics

    assert metrics.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert metrics.gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert metrics.gpu_peak_flops("NVIDIA H200") == 989e12
    assert metrics.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.gpu_peak_flops("NVIDIA Quantum Q1") is None  # unknown: no guess
    assert metrics.mfu(1e9, 1e3, None) is None
    assert metrics.mfu(1e9, 1e3, 1e13) == pytest.approx(0.1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Quantum Q1")
    peak, note = metrics.peak_flops(torch.device("cuda"))
    assert peak is None and "NVIDIA Quantum Q1" in note and "RAYGPT_PEAK_FLOPS" in note
    monkeypatch.setenv("RAYGPT_PEAK_FLOPS", "5e14")
    assert metrics.peak_flops(torch.device("cuda"))[0] == 5e14


# ---------------------------------------------------------------- bench

def _bench(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_throughput_steps_at_or_below_warmup(char_data):
    """--steps 5 with the default --warmup 10 crashed with a TypeError (no timed step)."""
    tput = _bench("train_throughput")
    assert tput.resolve_warmup(5, 10) == 2 and tput.resolve_warmup(60, 10) == 10
    assert tput.resolve_warmup(10, 10) == 5
    cfg = load_config("debug", overrides=[f"data.path={char_data}", "train.max_steps=5", "run.num_workers=1",
                                          "run.cpus_per_worker=1"])
    r = tput.plain_loop(cfg, 5, 10)
    assert r["timed_steps"] == 3 and r["tokens_per_s"] > 0 and r["mfu"] > 0


def test_gpu_check_cpu_smoke_env_stage_and_checks(tmp_path, monkeypatch):
    """bench/gpu_check.py: a stage subset writes the report; unknown stages are a usage error.
    (The whole --cpu-smoke run, every stage, takes ~4 min here: run by hand, see docs.)"""
    gc = _bench("gpu_check")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # --cpu-smoke sets it: restored after
    assert gc.main(["--cpu-smoke", "--stages", "nope", "--out", str(tmp_path / "x.json")]) == 2
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-smoke", "--stages", "env", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["stages"]["env"]["device"] == "cpu" and rep["stages"]["env"]["peak_flops"] > 0
    assert set(rep["checks"]) >= {"ray_mfu_ge_50pct", "shakespeare_le_1.47_within_60s", "checkpoint_blocking_lt_5pct"}
    assert all(v is None for v in rep["checks"].values())  # nothing measured: no verdict
    fake = {"stages": {"throughput": {"ratio": 0.99, "ray_train": {"mfu": 0.52}},
                       "shakespeare": {"best_val_loss": 1.46, "reached_after_train_s": 61.0},
                       "checkpoint": {"blocked_fraction": 0.01}, "tests": {"ok": True}}}
    assert gc.checks(fake) == {"gpu_tests_pass": True, "ray_mfu_ge_50pct": True, "ray_over_plain_ge_0.98": True,
                               "shakespeare_le_1.47_within_60s": False, "checkpoint_blocking_lt_5pct": True}


def test_ray_throughput_is_taken_over_the_windows_after_warmup():
    tput = _bench("train_throughput")
    recs = [{"step": 10, "step_ms": 900.0, "tokens_per_s": 10.0, "mfu": 0.01},  # warmup (compile)
            {"step": 20, "step_ms": 100.0, "tokens_per_s": 100.0, "mfu": 0.1},
            {"step": 25, "step_ms": 50.0, "tokens_per_s": 200.0, "mfu": 0.2}]
    r = tput.timed_windows(recs, warmup=10, tokens_per_step=10)
    assert r["timed_steps"] == 15 and r["tokens_per_s"] == pytest.approx(150 / 1.25)
    assert r["mfu"] == pytest.approx(0.2 * 120 / 200) and r["step_ms"] == pytest.approx(1250 / 15)


def test_gpu_check_sweep_runs_each_variant_in_its_own_process_and_picks_the_fastest(tmp_path, monkeypatch):
    """The sweep stage (CPU smoke: two tiny variants): every variant measured by a child
    process of the plain loop; `best` is the fastest; an unknown variant is an error."""
    gc = _bench("gpu_check")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "r.json"
    assert gc.main(["--cpu-smoke", "--stages", "env,sweep", "--out", str(out)]) == 0
    sw = json.loads(out.read_text())["stages"]["sweep"]
    assert set(sw["variants"]) == set(gc.SWEEP_SMOKE)
    tps = {n: v["tokens_per_s"] for n, v in sw["variants"].items()}
    assert all(t > 0 for t in tps.values()) and sw["best"] == max(tps, key=tps.get)
    assert sw["best_sets"] == gc.SWEEP_SMOKE[sw["best"]]
    # The same tiny model and data under either kernel and q/k/v layout: the same loss.
    losses = [v["loss"] for v in sw["variants"].values()]
    assert max(losses) - min(losses) < 1e-4
    assert gc.main(["--cpu-smoke", "--stages", "sweep", "--sweep", "nope", "--out", str(out)]) == 1
    assert "unknown variants" in json.loads(out.read_text())["stages"]["sweep"]["error"]


def test_checkpoint_stage_counts_what_the_background_write_costs():
    """gpu_check's save_costs: blocked time per save, and the steps a write overlapped
    (save to report event, plus one) charged their time above the clean median."""
    gc = _bench("gpu_check")
    recs = []
    for i in range(1, 31):
        recs.append({"step": i, "step_ms": 300.0 if i in (12, 13, 22) else 100.0})
        if i in (10, 20):
            recs.append({"event": "checkpoint", "step": i, "blocked_s": 0.05 if i == 20 else 0.5, "asynchronous": True})
        if i == 13:
            recs.append({"event": "checkpoint_reported", "step": 10})
        if i == 21:
            recs.append({"event": "checkpoint_reported", "step": 20})
    recs.append({"event": "checkpoint", "step": 30, "blocked_s": 1.0, "asynchronous": False})
    c = gc.save_costs(recs, every=10, steps=30)
    assert c["blocked_s"] == [0.05] and c["step_ms_median"] == 100.0  # the first save warms up
    assert c["blocked_fraction"] == pytest.approx(0.05 / 1.0)
    assert c["write_steps"] == {10: 4, 20: 2}  # 11..14 and 21..22
    assert c["lost_s"] == [pytest.approx(0.2)]  # the step-20 save: step 22 ran 200 ms over
    assert c["lost_fraction"] == pytest.approx(0.2)
