"""raygpt.train.faults: which rank and step an injected fault hits, and that a one-shot
fault fires once per run (its marker survives a restart, i.e. a new Injector)."""
from types import SimpleNamespace

import pytest

from raygpt.train import faults
from raygpt.train.faults import Injector


def test_fail_at_raises_on_its_rank_at_its_step_every_time(tmp_path):
    inject = {"fail_at": {"step": 5, "rank": 1}}
    Injector(inject, 0, tmp_path).before_step(None, 5)  # another rank: nothing
    Injector(inject, 1, tmp_path).before_step(None, 4)  # another step: nothing
    for _ in range(2):  # a restart fails again: a bug, not bad luck
        with pytest.raises(ValueError, match="injected bad batch at step 5"):
            Injector(inject, 1, tmp_path).before_step(None, 5)


def test_crash_in_save_fires_once_per_run(tmp_path, monkeypatch):
    exits = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    inject = {"crash_in_save_at": 20, "rank": 1}
    Injector(inject, 0, tmp_path).before_save(20)
    Injector(inject, 1, tmp_path).before_save(10)
    assert exits == []
    Injector(inject, 1, tmp_path).before_save(20)
    assert exits == [1] and (tmp_path / ".crash-in-save-injected").read_text() == "20"
    Injector(inject, 1, tmp_path).before_save(20)  # the restarted group saves step 20 again
    assert exits == [1]
    Injector(inject, 1, None).before_save(20)  # no run dir: no marker, so never
    assert exits == [1]


def test_slow_stretches_the_ranks_steps_from_its_step_on(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    trainer = SimpleNamespace(progress=SimpleNamespace(last_compute_s=0.5))
    inj = Injector({"slow": {"step": 3, "rank": 1, "factor": 3}}, 1, tmp_path)
    for step in (2, 3, 4):
        inj.before_step(trainer, step)
    assert slept == [1.0, 1.0]
