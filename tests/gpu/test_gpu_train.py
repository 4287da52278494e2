"""GPU paths (NCCL, bf16, async DCP saves). Skipped without CUDA; CI has no GPU.

NCCL refuses two ranks on one device, so the multi-worker strategies need as many GPUs
as workers; with one GPU only the single-worker tests run.
"""
from __future__ import annotations

import pytest
import torch

from raygpt.config import load_config
from raygpt.train.checkpoint.discovery import latest_checkpoint, list_checkpoints
from raygpt.train.checkpoint.io import read_state
from raygpt.train.launch import run_training
from raygpt.train.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cfg(data, storage, name, *sets, workers=1):
    return load_config("debug", overrides=[
        f"data.path={data}", f"run.storage={storage}", f"run.name={name}", f"run.num_workers={workers}",
        "run.use_gpu=true", "run.cpus_per_worker=1", "train.log_every=1", "optim.decay_steps=20", *sets])


def test_single_gpu_bf16_trains_and_checkpoints_async(ray_session, char_data, tmp_path):
    s = run_training(_cfg(char_data, tmp_path, "g1"), progress=False)
    assert s["steps"] == 20 and s["final_val_loss"] < 4.2 and s["mfu"] > 0
    assert [read_state(c)["step"] for c in list_checkpoints(tmp_path / "g1")] == [10, 20]
    ev = [r for r in read_metrics(tmp_path / "g1") if r.get("event") == "checkpoint"]
    assert ev[0]["asynchronous"] is True  # dcp.async_save on GPU


def test_gpu_resume(ray_session, char_data, tmp_path):
    run_training(_cfg(char_data, tmp_path, "r", "train.max_steps=10"), progress=False)
    s = run_training(_cfg(char_data, tmp_path, "r"), progress=False)
    assert s["steps"] == 20 and read_state(latest_checkpoint(tmp_path / "r"))["step"] == 20


@pytest.mark.parametrize("strategy,workers,extra", [
    ("ddp", 2, []), ("fsdp", 2, []), ("tp", 2, []),
    ("hsdp", 4, ["parallel.shard_degree=2"]),
])
def test_strategies_nccl(strategy, workers, extra, ray_session, char_data, tmp_path):
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs (NCCL: one rank per device)")
    s = run_training(_cfg(char_data, tmp_path, strategy, f"parallel.strategy={strategy}", *extra,
                          workers=workers), progress=False)
    assert s["steps"] == 20 and s["final_val_loss"] < 4.2
