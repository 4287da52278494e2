"""ReplicaMember's record of the quorum (raygpt.train.replica), on stand-ins for the
trainer and the torchft group (their gather answers are what a quorum would give)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from raygpt.train.replica import ReplicaMember


class _Writer:
    def __init__(self, log: list):
        self.enabled, self.log = True, log

    def event(self, name, **kw):
        if self.enabled:
            self.log.append((name, kw))


class _Group:
    count, heals, step, index = 2, 0, 0, 0

    def __init__(self, answers):
        self.answers = answers

    def gated(self, opt):
        return SimpleNamespace(committed=True)

    def register_state(self, *a):
        pass

    def begin_step(self):
        return self.step

    def gather(self, mine):
        return self.answers.pop(0)


def _member(log, answers, heals=0, step=0):
    model = torch.nn.Linear(2, 2)
    t = SimpleNamespace(rank=0, step=step, run_dir="x", writer=_Writer(log), parts=[model],
                        optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])
    g = _Group(answers)
    g.heals, g.step = heals, step
    return ReplicaMember(t, g)


def test_a_replacement_that_leads_records_the_full_quorum_it_rejoined():
    """Replica 0 (the leader) was drained; replica 1 led and wrote `missing [0]`. The
    replacement for 0 heals and leads again: it must write the quorum without anyone
    missing (the old leader's writer is off by then). Before, it started believing
    everyone present and wrote nothing: the out-stretch never closed in metrics.jsonl."""
    log = []
    m = _member(log, [[[1], [1]], [[1], [1]]], heals=1, step=40)
    assert m.join() is True and m.healed_step == 40
    m.t.step = 41
    m.rows([1])
    assert log == [("replica_quorum", {"step": 41, "replicas": [0, 1], "missing": []})]
    m.rows([1])  # no change: no event
    assert len(log) == 1


def test_a_group_that_started_together_records_only_changes():
    log = []
    m = _member(log, [[[1], [1]], [[1], None], [[1], [1]]])
    assert m.join() is False
    for step in (1, 2, 3):
        m.t.step = step
        m.rows([1])
    assert [(kw["step"], kw["missing"]) for _, kw in log] == [(2, [1]), (3, [])]
