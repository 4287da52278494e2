"""Preemption notices: a node drained with a deadline (the path cloud autoscalers and
KubeRay take before reclaiming a node) moves the run off it with nothing lost.

A driver thread asks Ray once a second which nodes are draining. When one hosts ranks of
the current worker group, it posts a notice in Ray's KV store; every rank's stop watcher
reads it within half a second, the ranks agree on a step (the per-step agreement), commit
a checkpoint there and exit with a `[raygpt-preempted]` mark. The failure policy
(raygpt.train.rayhooks) restarts them without charging `run.max_failures`, and the
elastic policy (raygpt.train.elastic) does not count draining nodes, so the group comes
back on the nodes that stay (elastic) or waits for capacity (fixed size). Ray Train's own
watcher (a 5 s poll, then a wait for the deadline) is not used.

The same path serves the straggler policy (`run.straggler_policy: drain`): rank 0 asks
for a slow node to be drained; this thread drains it, and the notice follows.

run.fault_tolerance=replica: nothing to checkpoint (the other replicas hold the state):
the notice names only the replicas on the draining nodes (each has its own gen); they
train on until 5 s before the deadline (at once without one), then leave, and Ray
replaces each on a node that stays; the others step on.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from raygpt import raycompat
from raygpt.train.heartbeat import NAMESPACE, newest_per_rank, read_beats, stop_thread

PREEMPTED_MARK = "[raygpt-preempted]"
POLL_S = 1.0


def notice_key(run_id: str) -> str:
    return f"preempt:{run_id}"


def drain_request_key(run_id: str) -> str:
    return f"drain-request:{run_id}"


@dataclass
class DrainWatch:
    run_id: str
    run_dir: Path
    poll_s: float = POLL_S
    notices: list = field(default_factory=list)  # what was posted (the driver's record)
    replica: bool = False  # run.fault_tolerance=replica: each rank is its own group

    def __post_init__(self):
        self._posted: set[tuple[str, frozenset]] = set()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, name="raygpt-drain-watch", daemon=True)

    def start(self) -> "DrainWatch":
        self._th.start()
        return self

    def stop(self) -> None:
        stop_thread(self._stop, self._th, notice_key(self.run_id), drain_request_key(self.run_id))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._serve_drain_request()
                draining = raycompat.draining_nodes()
                if draining:
                    self.check(read_beats(self.run_id), draining, time.time())
            except Exception as e:  # never take the run down
                sys.stderr.write(f"raygpt: drain watch skipped a check: {e}\n")

    # ---------------------------------------------------------------- judgement
    def check(self, beats: list[dict], draining: dict[str, float | None], now: float) -> dict | None:
        """Post a notice when draining nodes host ranks of the newest group (once per
        group and node set). Returns the notice posted, if any."""
        if not beats:
            return None
        if self.replica:
            return self._check_replicas(beats, draining, now)
        gen = max(beats, key=lambda r: r["started"])["gen"]
        group = [r for r in beats if r["gen"] == gen]
        hit = sorted({r["node"] for r in group if r.get("node") in draining})
        if not hit or (gen, frozenset(hit)) in self._posted:
            return None
        self._posted.add((gen, frozenset(hit)))
        deadlines = [draining[n] for n in hit if draining[n]]
        notice = {"gen": gen, "nodes": hit, "ranks": sorted(r["rank"] for r in group if r["node"] in hit),
                  "deadline": min(deadlines) if deadlines else None, "posted": now}
        self._post(notice)
        return notice

    def _check_replicas(self, beats: list[dict], draining: dict[str, float | None], now: float) -> dict | None:
        hit = [r for r in newest_per_rank(beats).values() if r.get("node") in draining and r["gen"] not in self._posted]
        if not hit:
            return None
        self._posted.update(r["gen"] for r in hit)
        nodes = sorted({r["node"] for r in hit})
        deadlines = [draining[n] for n in nodes if draining[n]]
        notice = {"gens": sorted(r["gen"] for r in hit), "nodes": nodes, "ranks": sorted(r["rank"] for r in hit),
                  "deadline": min(deadlines) if deadlines else None, "posted": now, "replica": True}
        self._post(notice)
        return notice

    def _post(self, notice: dict) -> None:
        raycompat.kv_put(notice_key(self.run_id), json.dumps(notice), namespace=NAMESPACE)
        self.notices.append(notice)
        left = f", deadline in {notice['deadline'] - notice['posted']:.0f} s" if notice["deadline"] else ""
        then = ("leave before the deadline, each replaced on a node that stays" if notice.get("replica")
                else "checkpoint and the run moves off them")
        sys.stderr.write(f"raygpt: node(s) {', '.join(n[:8] for n in notice['nodes'])} draining{left}: "
                         f"ranks {notice['ranks']} {then}\n")

    def _serve_drain_request(self) -> None:
        """Rank 0 asks for a node to be drained (the straggler policy): drain it once."""
        raw = raycompat.kv_get(drain_request_key(self.run_id), namespace=NAMESPACE)
        if not raw:
            return
        raycompat.kv_del(drain_request_key(self.run_id), namespace=NAMESPACE)
        req = json.loads(raw)
        ok, why = raycompat.drain_node(req["node"], "preemption", req.get("why", "raygpt straggler policy"))
        sys.stderr.write(f"raygpt: draining node {req['node'][:8]} ({req.get('why')}): "
                         f"{'accepted' if ok else 'refused: ' + why}\n")


def read_notice(run_id: str) -> dict | None:
    raw = raycompat.kv_get(notice_key(run_id), namespace=NAMESPACE)
    return json.loads(raw) if raw else None


def request_drain(run_id: str, node: str, why: str) -> None:
    """From a worker: ask the driver to drain `node` (it holds the cluster's view)."""
    raycompat.kv_put(drain_request_key(run_id), json.dumps({"node": node, "why": why}), namespace=NAMESPACE)
