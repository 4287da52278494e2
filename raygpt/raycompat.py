"""Ray's unstable corners, in one place.

What raygpt needs from Ray that Ray 2.60 has no public API for lives here, so the next
Ray a user's cluster runs breaks one module, not many. Every function is small and says
which Ray internal it stands on.
"""
from __future__ import annotations

import time

# Ray's drain reasons (autoscaler.proto DrainNodeReason), by our short names.
DRAIN_REASONS = {"preemption": "DRAIN_NODE_REASON_PREEMPTION", "idle": "DRAIN_NODE_REASON_IDLE_TERMINATION"}


def _gcs_client():
    import ray

    # ray._raylet.GcsClient: what `ray drain-node` itself uses.
    return ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)


def draining_nodes() -> dict[str, float | None]:
    """{node id (hex): deadline (epoch seconds) or None} of the nodes being drained."""
    import ray

    # ray._private.state: Ray Train's own preemption watcher reads the same.
    raw = ray._private.state.state.get_draining_nodes() or {}
    return {nid: (ms / 1000 if ms else None) for nid, ms in raw.items()}


def drain_node(node_id: str, reason: str = "preemption", message: str = "",
               deadline_s: float | None = None) -> tuple[bool, str]:
    """Ask the GCS to drain a node (the path cloud autoscalers take before reclaiming
    one): no new work is placed on it; it is not stopped. Returns (accepted, why not)."""
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int((time.time() + deadline_s) * 1000) if deadline_s else 0
    accepted, why = _gcs_client().drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASONS[reason]), message, deadline_ms)
    return bool(accepted), why or ""
