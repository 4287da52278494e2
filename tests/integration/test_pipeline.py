"""Pipeline parallelism on CPU (gloo): schedules reproduce the single-worker loss curve,
and a pipelined checkpoint resumes under other plans with identical parameters."""
from __future__ import annotations

import shutil

import pytest

from raygpt.config import load_config
from raygpt.model.io import load_model_dir
from raygpt.train.checkpoint.discovery import latest_checkpoint
from raygpt.train.export import export_checkpoint
from raygpt.train.launch import run_training
from raygpt.train.metrics import read_metrics

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def _cfg(data, storage, name, *sets, workers=1):
    return load_config("debug", overrides=[
        f"data.path={data}", f"run.storage={storage}", f"run.name={name}", f"run.num_workers={workers}",
        "run.cpus_per_worker=1", "train.log_every=1", "train.eval_every=10", "optim.decay_steps=20", *sets])


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _params(run_dir, out):
    model, _ = load_model_dir(export_checkpoint(latest_checkpoint(run_dir), out))
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def single(char_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("pp-runs")
    run_training(_cfg(char_data, storage, "one", "parallel.strategy=none"), progress=False)
    return storage / "one"


@pytest.mark.parametrize("name,sets,workers", [
    ("gpipe", ["parallel.pp_degree=2", "parallel.pp_schedule=gpipe"], 2),
    ("1f1b", ["parallel.pp_degree=2", "parallel.pp_schedule=1f1b"], 2),
    ("pp2-fsdp2", ["parallel.pp_degree=2", "parallel.strategy=fsdp"], 4),
])
def test_pipeline_matches_single_worker(name, sets, workers, single, char_data, tmp_path):
    s = run_training(_cfg(char_data, tmp_path, name, *sets, workers=workers), progress=False)
    assert "pp=2" in s["plan"]
    ref, got = _losses(single), _losses(tmp_path / name)
    assert sorted(got) == sorted(ref)
    diff = max(abs(got[k] - ref[k]) for k in ref)
    assert diff < 1e-4, f"{name}: max loss difference {diff:.2e}"


def test_interleaved_schedule_matches(char_data, tmp_path):
    four = ["model.n_layer=4"]
    run_training(_cfg(char_data, tmp_path, "one4", "parallel.strategy=none", *four), progress=False)
    run_training(_cfg(char_data, tmp_path, "inter", "parallel.pp_degree=2", "parallel.pp_schedule=interleaved",
                      "train.pp_microbatches=4", *four, workers=2), progress=False)
    ref, got = _losses(tmp_path / "one4"), _losses(tmp_path / "inter")
    assert max(abs(got[k] - ref[k]) for k in ref) < 1e-4


def test_pipelined_checkpoint_resumes_under_ddp_and_single(single, char_data, tmp_path):
    run_training(_cfg(char_data, tmp_path, "pp", "parallel.pp_degree=2", "train.max_steps=10", workers=2),
                 progress=False)
    shutil.copytree(tmp_path / "pp", tmp_path / "pp-single")
    run_training(_cfg(char_data, tmp_path, "pp", "parallel.strategy=ddp", workers=2), progress=False)
    run_training(_cfg(char_data, tmp_path, "pp-single", "parallel.strategy=none"), progress=False)
    ref = _params(single, tmp_path / "e0")
    for name in ("pp", "pp-single"):
        starts = [r for r in read_metrics(tmp_path / name) if r.get("event") == "start"]
        assert starts[-1]["step"] == 10 and starts[-1]["restored"]
        got = _params(tmp_path / name, tmp_path / f"e-{name}")
        worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert worst < 1e-5, f"{name}: {worst:.2e}"
