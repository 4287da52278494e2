"""Real Ray Train runs on the debug preset (CPU, gloo): the training math does not depend
on the parallel plan or world size, checkpoints resume exactly, and bad input is refused
before workers start."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raygpt.config import ConfigError, load_config
from raygpt.errors import UserError
from raygpt.model.io import load_model_dir
from raygpt.train.checkpoint.discovery import latest_checkpoint
from raygpt.train.checkpoint.io import CheckpointError
from raygpt.train.export import export_checkpoint
from raygpt.train.launch import run_training
from raygpt.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(data, storage, name, *sets, workers=1):
    return load_config("debug", overrides=[
        f"data.path={data}", f"run.storage={storage}", f"run.name={name}",
        f"run.num_workers={workers}", "run.cpus_per_worker=1",
        "train.log_every=1", "train.eval_every=10", "optim.decay_steps=20", *sets,
    ])


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _params(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = export_checkpoint(latest_checkpoint(run_dir), tmp / f"export-{run_dir.name}")
    model, _ = load_model_dir(out)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def baseline(char_data, tmp_path_factory):
    """One worker, no wrapper: the reference curve and parameters."""
    storage = tmp_path_factory.mktemp("runs")
    summary = run_training(_cfg(char_data, storage, "none", "parallel.strategy=none"), progress=False)
    return storage / "none", summary


def test_single_worker_run_writes_outputs(baseline):
    run_dir, summary = baseline
    for name in ("metrics.jsonl", "summary.json", "loss.png", "config.yaml"):
        assert (run_dir / name).is_file(), name
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 20
    assert s["final_val_loss"] is not None and s["best_val_loss"] <= s["final_val_loss"] + 1e-9
    assert s["tokens_per_s"] > 0 and s["train_seconds"] > 0
    assert s["checkpoint"] and Path(s["checkpoint"]).is_dir()
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1]  # it learns something in 20 steps


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_two_workers_match_one(strategy, baseline, char_data, tmp_path):
    ref = _losses(baseline[0])
    run_training(_cfg(char_data, tmp_path, strategy, f"parallel.strategy={strategy}", workers=2),
                 progress=False)
    got = _losses(tmp_path / strategy)
    assert sorted(got) == sorted(ref)
    diff = max(abs(got[s] - ref[s]) for s in ref)
    assert diff < 1e-4, f"{strategy}: max loss difference {diff:.2e} vs 1 worker"


def test_resume_is_exact_and_reshards(baseline, char_data, tmp_path):
    """10 steps on 1 worker, stop, resume the same run on 2 workers (fsdp) to step 20:
    parameters equal the straight 20-step run."""
    run_training(_cfg(char_data, tmp_path, "resumed", "train.max_steps=10",
                      "parallel.strategy=none"), progress=False)
    assert json.loads((latest_checkpoint(tmp_path / "resumed") / "raygpt_state.json").read_text())["step"] == 10
    run_training(_cfg(char_data, tmp_path, "resumed", "parallel.strategy=fsdp", workers=2),
                 progress=False)
    events = [r for r in read_metrics(tmp_path / "resumed") if r.get("event") == "start"]
    assert [e["step"] for e in events] == [0, 10] and events[1]["restored"]
    a = _params(baseline[0], tmp_path)
    b = _params(tmp_path / "resumed", tmp_path)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"resumed parameters differ by {worst:.2e}"


def test_checkpoint_of_other_shape_is_refused(baseline, char_data):
    storage = baseline[0].parent
    cfg = _cfg(char_data, storage, "none", "model.n_embd=64")
    with pytest.raises(CheckpointError, match="different model shape.*n_embd"):
        run_training(cfg, progress=False)


def test_more_workers_than_cluster_is_refused(char_data, tmp_path):
    cfg = _cfg(char_data, tmp_path, "big", "run.cpus_per_worker=4", "train.global_batch=16", workers=16)
    with pytest.raises(UserError, match=r"needs 16 workers of \{CPU: 4\}.*no autoscaler"):
        run_training(cfg, progress=False)


def test_unwritable_storage_is_refused(char_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="run.storage=.*not writable"):
        run_training(_cfg(char_data, blocker / "sub", "x"), progress=False)


def test_bad_plan_is_refused_before_workers(char_data, tmp_path):
    # hsdp with a shard group that does not divide the world size: the driver resolves
    # the plan for the requested size before starting anything.
    from raygpt.parallel.plan import PlanError, resolve_plan

    cfg = _cfg(char_data, tmp_path, "p", "parallel.strategy=hsdp", "parallel.shard_degree=3", workers=2)
    with pytest.raises(PlanError, match="shard_degree=3"):
        resolve_plan(cfg.parallel, 2)
    with pytest.raises(PlanError, match="shard_degree=3"):
        run_training(cfg, progress=False)


def test_export_and_generate_cli(baseline, tmp_path):
    run_dir, _ = baseline
    out = tmp_path / "model"
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "export", str(run_dir), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "generate", str(out), "--prompt", "ROMEO:",
                        "--max-tokens", "20", "--temperature", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # char tokens: exactly 20 generated characters follow the prompt (any characters:
    # a 20-step model may well prefer spaces)
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.rstrip("\n")) == len("ROMEO:") + 20
    r2 = subprocess.run([sys.executable, "-m", "raygpt.cli", "generate", str(out), "--prompt", "ROMEO:",
                         "--max-tokens", "20", "--temperature", "0"], capture_output=True, text=True)
    assert r2.stdout == r.stdout  # greedy is deterministic
    bad = subprocess.run([sys.executable, "-m", "raygpt.cli", "export", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "m2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_init_from_refuses_data_of_another_tokenizer(baseline, tmp_path):
    """Fine-tuning: the exported model's tokenizer wins; data encoded with another one
    is refused before any worker starts."""
    from raygpt.data.prepare import prepare_corpus
    from raygpt.train.commands import build_run_config

    model = export_checkpoint(latest_checkpoint(baseline[0]), tmp_path / "m")
    (tmp_path / "other.txt").write_text("abc xyz, qrs! " * 3000)
    prepare_corpus(tmp_path / "other.txt", tmp_path / "other", tokenizer="char")
    cfg = build_run_config(None, "debug", [f"data.path={tmp_path / 'other'}", f"run.storage={tmp_path}",
                                           "run.name=ft"], init_from=str(model))
    assert cfg.model.n_embd == 32 and cfg.train.init_from == str(model)
    with pytest.raises(UserError, match="another tokenizer"):
        run_training(cfg, progress=False)
