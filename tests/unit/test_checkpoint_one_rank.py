"""A one-rank run saves and restores its checkpoints without any collective (issue 29):
after DCP's collectives had run over the one-rank gloo group with the optimizer's
param-group payload, every later CPU step of the default run was ~1.45x slower (the
OpenMP worker sleeping between regions). The figures are in docs/performance.md; here
only the cause is checked: no torch.distributed collective during save or restore."""
from __future__ import annotations

import torch
import torch.distributed as dist

from raygpt.config import load_config
from raygpt.train.checkpoint.io import load_checkpoint, save_checkpoint
from raygpt.train.loop import build_optimizer
from raygpt.train.trainer import build_model

COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
               "all_reduce", "all_gather", "broadcast", "barrier", "reduce_scatter_tensor")


def _count_collectives(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def spy(*a, _name=name, _real=real, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(dist, name, spy)
    return calls


def test_one_rank_checkpoint_runs_no_collective(one_rank, tmp_path, monkeypatch):
    cfg = load_config("debug")
    model, _ = build_model(cfg, 65)
    opt = build_optimizer(model, cfg.optim, "cpu")
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))[1].backward()
    opt.step()  # optimizer state to save
    calls = _count_collectives(monkeypatch)
    save_checkpoint(tmp_path / "ck", model, opt, {"step": 1, "model": {}}, rank=0)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_checkpoint(tmp_path / "ck", model, opt)
    assert calls == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
