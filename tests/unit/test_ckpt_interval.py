"""checkpoint.every=auto's decisions (raygpt.train.ckpt_interval) on a given clock and on
metrics records as a run writes them."""
from __future__ import annotations

import math

import pytest

from raygpt.train.ckpt_interval import PRIOR_MTBF_S, PRIOR_SAVE_S, AutoInterval, History


def test_the_interval_is_youngs_from_the_measured_save_and_the_given_mtbf():
    a = AutoInterval(mtbf_s=300.0, history=History(), t_start=1000.0)
    c = a.choice(1000.0)
    assert c["save_s"] == PRIOR_SAVE_S and c["save_from"].startswith("assumed")
    assert c["interval_s"] == pytest.approx(math.sqrt(2 * PRIOR_SAVE_S * 300), abs=0.01)
    a.saved(1030.0, 0.3)
    a.saved(1060.0, 0.1)
    a.saved(1090.0, 0.2)  # the median of the saves, not the last one
    c = a.choice(1090.0)
    assert c["save_s"] == 0.2 and c["mtbf_from"] == "run.mtbf_s" and c["interval_s"] == pytest.approx(math.sqrt(120), abs=0.01)


def test_a_run_with_no_measured_save_saves_at_once_to_measure_one():
    a = AutoInterval(mtbf_s=3600.0, history=History(), t_start=0.0)
    assert a.due(0.0)
    a.saved(0.5, 0.1)
    assert not a.due(20.0) and a.due(0.5 + math.sqrt(2 * 0.1 * 3600))


def test_due_counts_from_the_last_save_or_the_group_start():
    a = AutoInterval(mtbf_s=50.0, history=History(saves_s=[1.0]), t_start=0.0)  # interval 10 s
    assert not a.due(9.9) and a.due(10.0)
    a.saved(10.5, 1.0)
    assert not a.due(20.0) and a.due(20.5)


def test_without_a_given_mtbf_the_run_s_own_failure_rate_is_used():
    # no failure yet: an hour, or the wall time so far when that is longer
    a = AutoInterval(mtbf_s=None, history=History(wall_s=100.0), t_start=0.0)
    assert a.mtbf(0.0)[0] == PRIOR_MTBF_S and a.mtbf(0.0)[1].startswith("assumed")
    a = AutoInterval(mtbf_s=None, history=History(wall_s=5000.0), t_start=0.0)
    assert a.mtbf(1000.0)[0] == 6000.0
    # 3 failures in 900 s of earlier groups, 300 s into this one: 1200 / 3
    a = AutoInterval(mtbf_s=None, history=History(wall_s=900.0, failures=3, saves_s=[0.5]), t_start=50.0)
    m, why = a.mtbf(350.0)
    assert m == 400.0 and "3 failure(s)" in why
    assert a.choice(350.0)["interval_s"] == pytest.approx(20.0)


def test_a_changed_interval_is_reported_again_a_steady_one_is_not():
    a = AutoInterval(mtbf_s=200.0, history=History(saves_s=[1.0]), t_start=0.0)
    assert a.changed(0.0)["interval_s"] == 20.0
    a.saved(20.0, 1.04)
    assert a.changed(20.0) is None  # the median moved by 1 %
    for t in (40.0, 60.0, 80.0):
        a.saved(t, 0.25)
    assert a.changed(80.0)["interval_s"] == 10.0  # median 0.25: half the interval


def _rec(t, **kw):
    return {"time": t, **kw}


def test_history_from_a_run_s_records_counts_died_groups_not_preemptions():
    recs = [
        _rec(0.0, event="launch", started=0.0),
        _rec(5.0, event="start", step=0, world_size=2, t0=1.0, train_seconds=0.0),
        _rec(10.0, step=10, train_seconds=5.0, loss=3.0),
        _rec(10.1, event="checkpoint", step=10, blocked_s=0.4),
        _rec(20.0, step=20, train_seconds=15.0, loss=2.9),  # then the group dies (no `end`)
        _rec(30.0, event="group_failed", decision="retry"),
        _rec(40.0, event="start", step=10, world_size=2, t0=35.0, train_seconds=5.0),
        _rec(50.0, step=20, train_seconds=15.0, loss=2.9),
        _rec(50.1, event="checkpoint", step=20, blocked_s=0.6),
        _rec(51.0, event="preemption", step=20),
        _rec(52.0, event="end", step=20, stopped="preemption"),  # a move, not a failure
    ]
    # read by the next group's rank 0 before its own `start` event
    h = History.from_records(recs, now=100.0)
    assert h.failures == 1 and h.wall_s == 100.0 and h.saves_s == [0.4, 0.6]
