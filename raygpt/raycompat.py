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


# ---------------------------------------------------------------- Ray's KV store
# ray.experimental.internal_kv: the GCS's key-value store, which the driver, every Train
# worker and every Serve replica reach with no actor of ours to place or keep alive (the
# heartbeats, hang verdicts, drain notices, stop requests, replica states, API keys).
# Ray 2.60 has no public KV API; the public route, a named actor holding a dict, would be
# one more process to schedule, restart and reach, and would go down with its node.

def kv_get(key: str | bytes, namespace: str | None = None) -> bytes | None:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_put(key: str | bytes, value: str | bytes, overwrite: bool = True, namespace: str | None = None) -> bool:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_put(key, value, overwrite, namespace=namespace)


def kv_del(key: str | bytes, prefix: bool = False, namespace: str | None = None) -> int:
    """Delete `key` (prefix=True: every key starting with it)."""
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_del(key, del_by_prefix=prefix, namespace=namespace)


def kv_keys(prefix: str | bytes, namespace: str | None = None) -> list[bytes]:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_list(prefix, namespace=namespace)


# ---------------------------------------------------------------- cluster state
def cluster_config():
    """The autoscaler's cluster config as the GCS holds it (node groups: name, resources,
    max count), or None. ray._private.state: Ray 2.60's public state API
    (ray.util.state) lists nodes, not the node types the autoscaler may launch."""
    from ray._private.state import state

    return state.get_cluster_config()


# ray.init logs "SIGTERM handler is not set" on this logger (named after the private
# module); Ray 2.60 has no public switch for that line.
RAY_WORKER_LOGGER = "ray._private.worker"


# ---------------------------------------------------------------- Ray Train v2
# Ray Train v2's public API (ray.train.v2.api) has no base class for a custom failure
# policy, scaling policy or controller/worker-group callback (its UserCallback only sees
# reports and exceptions), nor a public torch backend to extend: raygpt subclasses these,
# so they are re-exported here, imported on first use (importing raycompat stays cheap).
_TRAIN_CLASSES = {
    "FailureDecision": "ray.train.v2._internal.execution.failure_handling",
    "DefaultFailurePolicy": "ray.train.v2._internal.execution.failure_handling.default",
    "ElasticScalingPolicy": "ray.train.v2._internal.execution.scaling_policy",
    "NoopDecision": "ray.train.v2._internal.execution.scaling_policy",
    "ControllerCallback": "ray.train.v2._internal.execution.callback",
    "WorkerGroupCallback": "ray.train.v2._internal.execution.callback",
    "TorchBackend": "ray.train.torch.config:_TorchBackend",
    # run.fault_tolerance=replica: Ray's experimental torchft support (replaces only a
    # failed replica group); the backend is private, raygpt adds its worker hooks to it.
    "TorchftConfig": "ray.train.v2.torch.torchft_config",
    "TorchftBackend": "ray.train.v2.torch.torchft_config:_TorchftBackend",
    "LighthouseServerActor": "ray.train.v2.torch.torchft_config",
    # Train's default callbacks that raygpt drops where they only cost start-up (rayhooks)
    "DatasetsCallback": "ray.train.v2._internal.callbacks.datasets",
    "PlacementGroupCleanerCallback": "ray.train.v2._internal.callbacks.placement_group_callback",
}


def __getattr__(name: str):
    if name not in _TRAIN_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    mod, _, attr = _TRAIN_CLASSES[name].partition(":")
    return getattr(importlib.import_module(mod), attr or name)


def train_report_logger() -> str:
    """The logger Ray Train logs every report at INFO on: it is named after the file of
    ray.train.v2._internal.execution.context (no public logging option in Ray 2.60)."""
    from ray.train.v2._internal.execution import context

    return context.__file__


def train_worker_error_logger() -> str:
    """The logger Ray Train logs a training function's exception on, with its traceback
    (ray.train.v2._internal.util; no public option to quiet it in Ray 2.60)."""
    from ray.train.v2._internal import util

    return util.__name__


def start_autoscaling_coordinator() -> None:
    """Ray Train's controller gets-or-creates a detached AutoscalingCoordinator actor and
    waits for it before it places the workers: a new process (~1.2 s on 2 cores) started
    only once the controller's own process has started. Asked for by the driver right
    after ray.init (the call returns at once), it starts alongside the controller."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    get_or_create_autoscaling_coordinator()


def fresh_reserved_resources(policy, timeout_s: float):
    """What Ray Train's AutoscalingCoordinator reserves for an elastic `policy`, computed
    against the cluster as it is now. Its own answer is refreshed by a tick every 20 s
    (_AutoscalingCoordinatorActor.TICK_INTERVAL_S), so a node that joined was counted up
    to 20 s late (measured: a grow-back 21-44 s after the node rejoined); `recompute`
    ticks first. Raises what ray.get raises."""
    import ray

    return ray.get(policy._autoscaling_coordinator.get_reserved_resources.remote(
        policy._requester_id, recompute=True), timeout=timeout_s)


# ---------------------------------------------------------------- Ray Serve
# Serve 2.60's public API deploys applications (serve.run, a config file) but cannot
# change one deployment's user_config of an imperatively deployed app without a new code
# version (which restarts its replicas), and its public status API has no handle to the
# controller: raygpt's zero-downtime promote goes through the controller client.

def serve_client():
    """Serve's controller client, or None when no Serve instance runs
    (ray.serve.context._get_global_client)."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def serve_get_deploy_args():
    """ray.serve._private.deploy_utils.get_deploy_args (raises ImportError when this
    Serve has moved it)."""
    from ray.serve._private.deploy_utils import get_deploy_args

    return get_deploy_args


def serve_deployments(client) -> dict:
    """{DeploymentID: (DeploymentInfo, route prefix)} from the controller."""
    import ray

    return ray.get(client._controller.list_deployments_internal.remote())


def serve_external_scaler_enabled(client, app: str) -> bool:
    import ray

    return bool(ray.get(client._controller.get_external_scaler_enabled.remote(app)))


def serve_deploy_applications(client, deployment_args: dict, app_args: dict) -> None:
    """The controller's deploy call (what serve.run sends), with our own arguments."""
    import ray

    ray.get(client._controller.deploy_applications.remote(deployment_args, app_args))
