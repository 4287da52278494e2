"""The hang watchdog's kill of a frozen process on its own node (raygpt.train.watchdog.
kill_frozen), on a real Ray worker frozen with SIGSTOP: gone in seconds, while Ray
alone took 11.6 s to give up on it in a soak (each rank on its own node, no peer there
to kill it)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from conftest import wait_for
from raygpt.train.watchdog import STALE_BEAT_S, kill_frozen


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_a_frozen_worker_is_killed_on_its_node(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Victim:
        def where(self):
            return os.getpid(), ray.get_runtime_context().get_node_id()

    v = Victim.remote()
    pid, node = ray.get(v.where.remote(), timeout=60)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        sent = kill_frozen({"stuck": [{"rank": 1, "pid": pid, "node": node, "last_beat_s": STALE_BEAT_S + 1}]})
        assert sent == 1
        wait_for(lambda: not _alive(pid), 30, f"frozen pid {pid} killed")
        print(f"frozen worker killed {time.time() - t0:.1f} s after the verdict")
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(v.where.remote(), timeout=30)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_rank_that_still_beats_or_an_unknown_pid_is_not_killed(ray_session):
    """A rank named only for being behind (it still beats) exits by itself; a verdict
    without a node or pid sends nothing."""
    assert kill_frozen({"stuck": [{"rank": 0, "pid": os.getpid(), "node": "x" * 56, "last_beat_s": 1.0}]}) == 0
    assert kill_frozen({"stuck": [{"rank": 0, "last_beat_s": 9.0}]}) == 0
    assert _alive(os.getpid())
