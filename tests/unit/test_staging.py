"""Async-checkpoint staging (raygpt/train/staging.py): the same stager serves every save.

torch 2.11's DefaultStager raised ``KeyError: <class 'type'>`` at the second stage() of one
stager (the GPU image's torch): the second async save of every GPU run would have failed.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from raygpt.train.staging import PinnedStager


def _state():
    return {"model": {"w": torch.randn(4, 3), "b": torch.randn(3)},
            "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
                      "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.95)}]}}


def test_second_stage_reuses_buffers_and_snapshots_the_values():
    s, sd = PinnedStager(pin=False), _state()
    first = s.stage(sd)
    ptr = first["model"]["w"].data_ptr()
    assert torch.equal(first["model"]["w"], sd["model"]["w"]) and first["model"]["w"].data_ptr() != sd["model"]["w"].data_ptr()
    sd["model"]["w"].add_(1.0)  # training goes on: the staged copy must not change
    assert not torch.equal(first["model"]["w"], sd["model"]["w"])
    allocated = s.allocations
    second = s.stage(sd)  # the call that raised with torch 2.11's DefaultStager
    assert s.allocations == allocated  # no new buffer
    assert second["model"]["w"].data_ptr() == ptr and torch.equal(second["model"]["w"], sd["model"]["w"])
    assert second["optim"]["param_groups"] == [{"lr": 0.1, "params": [0], "betas": (0.9, 0.95)}]
    assert torch.equal(second["optim"]["state"][0]["exp_avg"], sd["optim"]["state"][0]["exp_avg"])


def test_tied_weights_are_staged_once():
    w = torch.randn(6, 4)
    s = PinnedStager(pin=False)
    out = s.stage({"wte.weight": w, "lm_head.weight": w.detach(), "other": torch.randn(3)})
    assert out["wte.weight"] is out["lm_head.weight"] and s.allocations == 2
    assert torch.equal(out["lm_head.weight"], w)


def test_a_changed_shape_gets_a_new_buffer():
    s = PinnedStager(pin=False)
    s.stage({"w": torch.zeros(2)})
    out = s.stage({"w": torch.ones(5)})
    assert out["w"].shape == (5,) and torch.equal(out["w"], torch.ones(5)) and s.allocations == 2


@pytest.fixture
def gloo_world_1(tmp_path):
    if dist.is_initialized():  # another module's group: use it
        assert dist.get_world_size() == 1
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_saves_through_one_stager_round_trip_with_dtensors(gloo_world_1, tmp_path, mode):
    """Three saves through one stager, written by a thread or by the checkpoint process
    (checkpoint.async_mode=process: buffers in shared memory, handed over as handles)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
    s, group = PinnedStager(pin=False, shared=mode == "process"), dist.new_group(backend="gloo")
    kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
    for step in range(3):  # three saves through one stager
        sd = {"model": {"w": w, "plain": torch.full((3,), float(step))}}
        staged = s.stage(sd)
        assert isinstance(staged["model"]["w"], DTensor) and staged["model"]["w"].to_local().device.type == "cpu"
        assert staged["model"]["plain"].is_shared() == (mode == "process")
        fut = dcp.async_save(sd, checkpoint_id=str(tmp_path / f"c{step}"), process_group=group, async_stager=s,
                             async_checkpointer_type=kind)
        fut.result()
        back = {"model": {"w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]), "plain": torch.zeros(3)}}
        dcp.load(back, checkpoint_id=str(tmp_path / f"c{step}"))
        assert torch.equal(back["model"]["w"].full_tensor(), w.full_tensor())
        assert torch.equal(back["model"]["plain"], torch.full((3,), float(step)))
        with torch.no_grad():
            w.add_(1.0)
