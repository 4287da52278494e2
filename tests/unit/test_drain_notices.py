"""Drain notices (raygpt.train.preemption), the failure policy's view of a planned move,
and the elastic policy's raylet probes."""
from __future__ import annotations

import socket
import time

import pytest

from raygpt.config import load_config
from raygpt.train.elastic import LiveElasticScalingPolicy, probe_all, raylet_answers
from raygpt.train.preemption import PREEMPTED_MARK, DrainWatch
from raygpt.train.rayhooks import moved_off_drain


def _beat(gen, rank, node, started=1.0):
    return {"gen": gen, "rank": rank, "node": node, "started": started}


class _Posting(DrainWatch):
    def _post(self, notice):  # the KV write: recorded instead (no Ray here)
        self.notices.append(notice)


def test_a_drain_on_a_node_of_the_current_group_posts_one_notice_per_group(tmp_path):
    w = _Posting("run", tmp_path)
    old = [_beat("g1", 0, "a", 1.0), _beat("g1", 1, "b", 1.0)]
    assert w.check(old, {"c": None}, 10.0) is None  # a node we do not run on
    n = w.check(old, {"b": 40.0}, 10.0)
    assert n == {"gen": "g1", "nodes": ["b"], "ranks": [1], "deadline": 40.0, "posted": 10.0}
    assert w.check(old, {"b": 40.0}, 11.0) is None  # once per group and node set
    # the restarted group (newer `started`) on node a only: the old group's beats do not count
    new = [*old, _beat("g2", 0, "a", 5.0)]
    assert w.check(new, {"b": 40.0}, 12.0) is None
    # a second node drained under the new group: a new notice
    assert w.check(new, {"b": 40.0, "a": None}, 13.0)["nodes"] == ["a"]


def test_a_planned_move_is_told_from_a_failure():
    class _Err(Exception):
        def __init__(self, texts):
            self.worker_failures = dict(enumerate(texts))

    assert moved_off_drain(_Err([f"Preempted: {PREEMPTED_MARK} node(s) ab draining"] * 2))
    assert not moved_off_drain(_Err([f"{PREEMPTED_MARK} ...", "RuntimeError: gloo connection reset"]))
    assert not moved_off_drain(_Err([]))


def test_the_drain_policy_needs_an_elastic_run():
    load_config("debug", overrides=["run.num_workers=2", "run.min_workers=1", "run.straggler_policy=drain"])
    with pytest.raises(Exception, match="straggler_policy=drain needs an elastic run"):
        load_config("debug", overrides=["run.num_workers=2", "run.straggler_policy=drain"])


@pytest.fixture
def silent_listeners():
    """Loopback listeners whose accept queue is full: a connect to them gets no answer
    (the SYN is dropped), as with a vanished host."""
    socks, addrs = [], []
    for _ in range(5):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        socks.append(s)
        addrs.append(s.getsockname())
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(s.getsockname())
            except BlockingIOError:
                pass
            socks.append(c)
    yield addrs
    for s in socks:
        s.close()


def test_unanswering_raylets_are_probed_at_once_not_one_after_another(silent_listeners):
    assert raylet_answers(*silent_listeners[0], timeout=0.5) is False
    live = socket.socket()
    live.bind(("127.0.0.1", 0))
    live.listen(8)
    t0 = time.monotonic()
    answers = probe_all([*silent_listeners, live.getsockname()], timeout=1.0)
    took = time.monotonic() - t0
    live.close()
    assert answers == [False] * 5 + [True]
    assert took < 3.0, f"5 silent raylets took {took:.1f} s (one after another: >= 5 s)"


def test_another_ray_than_the_tested_one_gets_one_line(monkeypatch):
    import ray

    from raygpt import raycompat

    lines: list[str] = []
    assert raycompat.check_ray_version(lines.append)  # this environment pins the tested one
    monkeypatch.setattr(ray, "__version__", "2.99.0")
    monkeypatch.setattr(raycompat, "_warned", False)
    assert not raycompat.check_ray_version(lines.append)
    assert not raycompat.check_ray_version(lines.append)  # once per process
    assert len(lines) == 1 and "tested with Ray 2.60.*, found Ray 2.99.0" in lines[0] and "\n" == lines[0][-1]


class _Reserved(LiveElasticScalingPolicy):
    """The live policy's decisions on given reserved resources (no coordinator actor)."""
    reserved: dict = {}

    def _maybe_send_resource_request(self):
        pass

    def _get_reserved_resources(self):
        return self.reserved


def test_a_running_group_grows_with_a_resize_event_and_never_shrinks(tmp_path):
    """A shrink of a running group tore it down 0.8 s after a drain, before its ranks
    could checkpoint (a soak lost 18 steps): a running group is never shrunk. A grow is
    a `resize` event, so the goodput ledger does not count a failure."""
    import ray.train
    from types import SimpleNamespace

    from raygpt.train.metrics import read_metrics

    pol = _Reserved(ray.train.ScalingConfig(num_workers=(1, 3), resources_per_worker={"CPU": 1},
                                            elastic_resize_monitor_interval_s=0.0), str(tmp_path))
    group = SimpleNamespace(start_time=0.0, num_workers=2)  # a running group's state (2 workers)
    pol.reserved = {"a": {"CPU": 1.0}}  # one node left (the other draining)
    assert type(pol.make_decision_for_running_worker_group(group, None)).__name__ == "NoopDecision"
    pol.reserved = {"a": {"CPU": 1.0}, "b": {"CPU": 1.0}, "c": {"CPU": 1.0}}
    d = pol.make_decision_for_running_worker_group(group, None)
    assert d.num_workers == 3
    (ev,) = [r for r in read_metrics(tmp_path) if r.get("event") == "resize"]
    assert ev["world_from"] == 2 and ev["world_to"] == 3


def test_replica_mode_names_only_the_replicas_on_the_draining_node(tmp_path):
    """run.fault_tolerance=replica: every rank has its own gen; the notice lists the gens
    of the ranks on the draining node (they leave), once each; a replacement there is new."""
    w = _Posting("run", tmp_path, replica=True)
    beats = [_beat("r0", 0, "a", 1.0), _beat("r1", 1, "b", 2.0), _beat("r2", 2, "b", 3.0)]
    n = w.check(beats, {"b": 40.0}, 10.0)
    assert n == {"gens": ["r1", "r2"], "nodes": ["b"], "ranks": [1, 2], "deadline": 40.0, "posted": 10.0,
                 "replica": True}
    assert w.check(beats, {"b": 40.0}, 11.0) is None  # once per replica
    # rank 1's replacement (newer start, on node a): not draining; rank 0 unaffected
    assert w.check([*beats, _beat("r1b", 1, "a", 20.0)], {"b": 40.0}, 21.0) is None


def test_a_replica_on_a_draining_node_trains_until_just_before_the_deadline(capsys):
    """Its replacement cannot start on a draining node, so leaving at the notice left the
    run a replica short for the whole notice (a soak: back 48 s after a 30 s notice)."""
    import time

    from raygpt.train.worker import REPLICA_LEAVE_MARGIN_S, _StopWatcher

    w = _StopWatcher(None, gen="g", rank=1)  # no run id: no polling thread
    now = time.time()
    notice = {"gens": ["g"], "nodes": ["abcdef123456"], "deadline": now + 30, "posted": now}
    assert w._leave_at(notice) == now + 30 - REPLICA_LEAVE_MARGIN_S
    assert "leaves in 2" in capsys.readouterr().out  # said once, with the wait
    assert w._leave_at({**notice, "deadline": None}) == 0.0  # no deadline: at once
    assert capsys.readouterr().out == ""
