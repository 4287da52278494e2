"""Elastic sizing from what is alive now.

Ray Train V2's ElasticScalingPolicy sizes a (re)started worker group from the resources
the AutoscalingCoordinator has reserved, which come from `ray.nodes()`. A node whose
raylet died stays "Alive" there until the GCS health check gives up on it (tens of
seconds), so after a node loss the controller restarted at the old size and waited out
the whole worker-group start timeout (45 s in `raygpt chaos`, 300 s outside) before
trying the smaller size.

LiveElasticScalingPolicy drops from those resources every node whose raylet does not
answer a TCP connect (a dead process refuses at once; a vanished host times out in
PROBE_TIMEOUT_S; all nodes are probed at once, so N vanished hosts cost one timeout, not
N, inside Ray's async controller) and every node being drained (a preemption notice:
the group is moving off it), so the restart happens at the size the live cluster can
place, and a grow happens at the next resize check after capacity returns (the
reservation is recomputed at each check: the coordinator's own refresh runs every 20 s).
"""
from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from raygpt import raycompat
from raygpt.raycompat import ElasticScalingPolicy

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
RESERVED_TIMEOUT_S = 5.0  # as Ray's own call (AUTOSCALING_REQUESTS_GET_TIMEOUT_S)


def raylet_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_all(addrs: list[tuple[str, int]], timeout: float = PROBE_TIMEOUT_S) -> list[bool]:
    """raylet_answers for every address at once: the whole probe takes one timeout."""
    if not addrs:
        return []
    with ThreadPoolExecutor(max_workers=min(64, len(addrs))) as ex:
        return list(ex.map(lambda a: raylet_answers(a[0], a[1], timeout), addrs))


def live_node_ids(node_ids) -> set[str]:
    """The node ids (hex) among `node_ids` that GCS lists alive, not draining, and whose
    raylet answers."""
    import ray

    wanted = set(node_ids) - set(raycompat.draining_nodes())
    nodes = [n for n in ray.nodes() if n.get("NodeID") in wanted and n.get("Alive")]
    answers = probe_all([(n["NodeManagerAddress"], int(n["NodeManagerPort"])) for n in nodes])
    return {n["NodeID"] for n, ok in zip(nodes, answers) if ok}


class LiveElasticScalingPolicy(ElasticScalingPolicy):
    """ElasticScalingPolicy that counts only nodes that answer now (see module doc).
    Runs inside the Train controller actor. A resize of a running group is a `resize`
    event in the run's metrics.jsonl: the group it ends did not fail (the goodput ledger
    counts its end as a restart, not a failure)."""

    def __init__(self, scaling_config, run_dir: str | None = None):
        super().__init__(scaling_config)
        self._run_dir = run_dir
        self._fresh_t = float("-inf")

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        to = getattr(decision, "num_workers", None)
        if to is not None and to < worker_group_state.num_workers:
            # Never shrink a running group: a node that died fails it anyway, and a
            # draining one is left by the workers after their checkpoint (a resize here
            # tore the group down 0.8 s after a drain, before the notice reached it, and
            # lost the steps since the last save). The restart then sizes it.
            from raygpt.raycompat import NoopDecision

            return NoopDecision()
        if to is not None and self._run_dir:
            from raygpt.train.metrics import append_event

            try:
                append_event(self._run_dir, "resize", world_from=worker_group_state.num_workers, world_to=to)
            except OSError:
                pass
        return decision

    def _get_reserved_resources(self):
        now = time.monotonic()
        if now - self._fresh_t < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources  # the cached answer: already filtered
        self._fresh_t = now
        try:
            reserved = raycompat.fresh_reserved_resources(self, RESERVED_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - as Ray's own: no resize this time, training goes on
            logger.warning("raygpt: could not read the reserved resources; no resize this time", exc_info=True)
            reserved = None
        self._latest_reserved_resources = reserved
        if reserved is None:
            return None
        try:
            live = live_node_ids(reserved)
        except Exception:  # a failed probe must never stop training: Ray's own view
            logger.warning("raygpt: node liveness probe failed", exc_info=True)
            return reserved
        dead = set(reserved) - live
        if dead:
            logger.warning("raygpt: not counting %d node(s) draining or whose raylet does not answer: %s",
                           len(dead), ", ".join(sorted(d[:12] for d in dead)))
            reserved = {k: v for k, v in reserved.items() if k in live}
            self._latest_reserved_resources = reserved
        return reserved
