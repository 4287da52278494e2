"""Elastic sizing from what is alive now.

Ray Train V2's ElasticScalingPolicy sizes a (re)started worker group from the resources
the AutoscalingCoordinator has reserved, which come from `ray.nodes()`. A node whose
raylet died stays "Alive" there until the GCS health check gives up on it (tens of
seconds), so after a node loss the controller restarted at the old size and waited out
the whole worker-group start timeout (45 s in `raygpt chaos`, 300 s outside) before
trying the smaller size.

LiveElasticScalingPolicy drops from those resources every node whose raylet does not
answer a TCP connect (a dead process refuses at once; a vanished host times out in
PROBE_TIMEOUT_S), so the restart happens at the size the live cluster can place, and a
grow happens at the next resize check after capacity returns.
"""
from __future__ import annotations

import logging
import socket

from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0


def raylet_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def live_node_ids(node_ids) -> set[str]:
    """The node ids (hex) among `node_ids` that GCS lists alive and whose raylet answers."""
    import ray

    wanted = set(node_ids)
    live = set()
    for n in ray.nodes():
        nid = n.get("NodeID")
        if nid not in wanted or not n.get("Alive"):
            continue
        if raylet_answers(n["NodeManagerAddress"], int(n["NodeManagerPort"])):
            live.add(nid)
    return live


class LiveElasticScalingPolicy(ElasticScalingPolicy):
    """ElasticScalingPolicy that counts only nodes that answer now (see module doc).
    Runs inside the Train controller actor."""

    def _get_reserved_resources(self):
        before = self._latest_reserved_resources_query_time
        reserved = super()._get_reserved_resources()
        if reserved is None or self._latest_reserved_resources_query_time == before:
            return reserved  # the cached answer: already filtered
        try:
            live = live_node_ids(reserved)
        except Exception:  # a failed probe must never stop training: Ray's own view
            logger.warning("raygpt: node liveness probe failed", exc_info=True)
            return reserved
        dead = set(reserved) - live
        if dead:
            logger.warning("raygpt: not counting %d node(s) whose raylet does not answer: %s",
                           len(dead), ", ".join(sorted(d[:12] for d in dead)))
            reserved = {k: v for k, v in reserved.items() if k in live}
            self._latest_reserved_resources = reserved
        return reserved
