"""Ray's unstable corners, in one place.

What raygpt needs from Ray that Ray 2.60 has no public API for lives here, so the next
Ray a user's cluster runs breaks one module, not many. Every function is small and says
which Ray internal it stands on.
"""
from __future__ import annotations

import sys
import time

TESTED_RAY = "2.60"  # the Ray release this build's private-API uses were checked against
_warned = False


def check_ray_version(write=sys.stderr.write) -> bool:
    """One line when the installed Ray is not the one this build was tested with (the
    functions below may then break). Returns whether it matches."""
    global _warned
    import ray

    ok = ray.__version__ == TESTED_RAY or ray.__version__.startswith(TESTED_RAY + ".")
    if not ok and not _warned:
        _warned = True
        write(f"raygpt: warning: tested with Ray {TESTED_RAY}.*, found Ray {ray.__version__}; "
              f"fault handling (drain notices, elastic sizing) uses Ray internals that may have changed\n")
    return ok

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
