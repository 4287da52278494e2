"""What a Ray cluster can place now, and what its autoscaler may still add.

The driver refuses only what can never fit. When the workers fit only once the
autoscaler adds nodes (GPU node types that start at zero, the usual cloud setup), it
asks the autoscaler for them (`request_resources`), prints what it waits for, and gives
up with a clear message after `run.placement_timeout_s`.

Where the autoscaler's node types come from, first found wins:
1. the cluster config the autoscaler publishes in the GCS (autoscaler v2, KubeRay);
2. `$RAYGPT_AUTOSCALER_CONFIG`: a cluster-launcher YAML;
3. the `--autoscaling-config` of an autoscaler (monitor) process on this machine: the
   driver of `ray job submit` runs on the head, where the monitor runs;
4. `~/ray_bootstrap_config.yaml`, which `ray up` leaves on the head.
No source: the cluster is taken as fixed (a laptop, `ray start` by hand).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from raygpt.errors import UserError

NODE_GROUP_LABEL = "ray.io/node-group"
# Resources every node has that say nothing about what a worker needs.
_IGNORED = ("memory", "object_store_memory")


def _relevant(res: dict) -> dict[str, float]:
    return {k: float(v) for k, v in res.items()
            if k not in _IGNORED and not k.startswith("node:") and not k.startswith("accelerator_type:")}


def per_node(node_res: dict, per_worker: dict) -> int:
    """How many workers needing `per_worker` fit on one node with `node_res`."""
    n = math.inf
    for k, v in per_worker.items():
        if v <= 0:
            continue
        n = min(n, math.floor(float(node_res.get(k, 0.0)) / v + 1e-9))
    return 0 if n is math.inf else int(n)


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict  # {} when the YAML leaves them to be detected from the instance type
    max_count: int  # -1: no limit of its own
    is_head: bool = False


@dataclass
class Node:
    node_id: str
    resources: dict
    node_type: str | None


@dataclass
class Capacity:
    nodes: list[Node] = field(default_factory=list)
    node_types: list[NodeType] = field(default_factory=list)
    max_worker_nodes: int | None = None  # the cluster-wide cap on worker nodes (YAML max_workers)
    source: str | None = None  # where the node types were read; None: a fixed cluster

    @property
    def autoscaling(self) -> bool:
        return any(t.max_count != 0 and not t.is_head for t in self.node_types)

    def placeable_now(self, per_worker: dict) -> int:
        return sum(per_node(n.resources, per_worker) for n in self.nodes)

    def _count_of(self, t: NodeType) -> int:
        labelled = [n for n in self.nodes if n.node_type is not None]
        if labelled:
            return sum(1 for n in self.nodes if n.node_type == t.name)
        want = _relevant(t.resources)
        return sum(1 for n in self.nodes if want and _relevant(n.resources) == want)

    def additions(self, per_worker: dict) -> list[tuple[NodeType, int, int]]:
        """(node type, nodes it may still add, workers per node) for every worker node
        type that can host a worker, best first, within the cluster-wide cap."""
        out = []
        for t in self.node_types:
            if t.is_head or not t.resources:
                continue
            k = per_node(t.resources, per_worker)
            if k <= 0:
                continue
            room = math.inf if t.max_count < 0 else max(0, t.max_count - self._count_of(t))
            out.append((t, room, k))
        out.sort(key=lambda x: -x[2])
        budget = math.inf
        if self.max_worker_nodes is not None:
            workers_up = sum(self._count_of(t) for t in self.node_types if not t.is_head)
            budget = max(0, self.max_worker_nodes - workers_up)
        capped = []
        for t, room, k in out:
            take = min(room, budget)
            budget -= take
            capped.append((t, take, k))
        return capped

    def placeable_eventually(self, per_worker: dict) -> float:
        return self.placeable_now(per_worker) + sum(room * k for _, room, k in self.additions(per_worker))

    def unknown_types(self) -> list[str]:
        """Worker node types whose resources the YAML leaves to detection: we cannot
        tell whether a worker fits there, so such a cluster is never refused up front."""
        return [t.name for t in self.node_types if not t.is_head and not t.resources and t.max_count != 0]

    def eventual_totals(self) -> dict[str, float]:
        """Resources once every node type is at its maximum (for sizing Tune trials)."""
        tot: dict[str, float] = {}
        for n in self.nodes:
            for k, v in n.resources.items():
                tot[k] = tot.get(k, 0.0) + float(v)
        budget = math.inf if self.max_worker_nodes is None else max(
            0, self.max_worker_nodes - sum(self._count_of(t) for t in self.node_types if not t.is_head))
        for t in self.node_types:
            if t.is_head or not t.resources:
                continue
            room = (math.inf if t.max_count < 0 else max(0, t.max_count - self._count_of(t)))
            room = min(room, budget)
            if room is math.inf:
                room = 64  # "unlimited": large enough for any sweep we size
            budget -= room
            for k, v in t.resources.items():
                tot[k] = tot.get(k, 0.0) + float(v) * room
        return tot

    def never_fits_message(self, what: str, n: int, per_worker: dict) -> str:
        now = self.placeable_now(per_worker)
        parts = [f"{what}={n} needs {n} workers of {_fmt(per_worker)}"]
        adds = self.additions(per_worker)
        limits = [f"node type '{t.name}' ({_fmt(_relevant(t.resources))}) takes {k} per node, "
                  f"max_workers {t.max_count}" for t, _, k in adds]
        no_fit = [t.name for t in self.node_types
                  if not t.is_head and t.resources and per_node(t.resources, per_worker) == 0]
        if self.autoscaling:
            msg = (f"; the nodes up now place {now} and the autoscaler can add room for "
                   f"{int(self.placeable_eventually(per_worker) - now)} more")
            if limits:
                msg += " (" + "; ".join(limits) + ")"
            if self.max_worker_nodes is not None:
                msg += f", at most {self.max_worker_nodes} worker nodes in all"
            if no_fit:
                msg += f"; too small for one worker: {', '.join(no_fit)}"
            parts.append(msg)
        else:
            have = {}
            for nd in self.nodes:
                for k in per_worker:
                    have[k] = have.get(k, 0.0) + float(nd.resources.get(k, 0.0))
            parts.append(f" but the cluster has {_fmt(have)} and no autoscaler that could add nodes")
        parts.append(": lower --num-workers or the per-worker resources, or raise the node type's max_workers")
        return "".join(parts)


# ---------------------------------------------------------------------- reading it


def _alive_nodes() -> list[Node]:
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = n.get("Labels") or {}
        out.append(Node(n["NodeID"], dict(n.get("Resources") or {}), labels.get(NODE_GROUP_LABEL)))
    return out


def _types_from_gcs() -> tuple[list[NodeType], int | None] | None:
    try:
        from raygpt import raycompat

        cfg = raycompat.cluster_config()
    except Exception:
        return None
    if cfg is None or not cfg.node_group_configs:
        return None
    types = [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
             for g in cfg.node_group_configs]
    return types, None


def types_from_yaml(cfg: dict) -> tuple[list[NodeType], int | None]:
    """Node types and the cluster-wide worker cap from a cluster-launcher config."""
    head = cfg.get("head_node_type")
    types = []
    for name, t in (cfg.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        types.append(NodeType(name, res, int(t.get("max_workers", 0) if name != head else 0),
                              is_head=name == head))
    cap = cfg.get("max_workers")
    return types, (int(cap) if cap is not None else None)


def _gcs_address() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().gcs_address
    except Exception:
        return None


def _monitor_config_paths(gcs_address: str | None) -> Iterable[str]:
    """--autoscaling-config of this cluster's autoscaler process, when it runs on this
    machine (matched by its --gcs-address: another cluster's monitor may run here too)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return
    port = gcs_address.rsplit(":", 1)[-1] if gcs_address else None
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") or a.endswith("autoscaler/v2/monitor.py")
                   for a in args[:3]):
            continue
        gcs = next((a.split("=", 1)[1] for a in args if a.startswith("--gcs-address=")), None)
        if port is not None and gcs is not None and gcs.rsplit(":", 1)[-1] != port:
            continue
        for i, a in enumerate(args):
            if a.startswith("--autoscaling-config="):
                yield a.split("=", 1)[1]
            elif a == "--autoscaling-config" and i + 1 < len(args):
                yield args[i + 1]


def _types_from_files() -> tuple[list[NodeType], int | None, str] | None:
    import yaml

    candidates = []
    if os.environ.get("RAYGPT_AUTOSCALER_CONFIG"):
        candidates.append(os.environ["RAYGPT_AUTOSCALER_CONFIG"])
    candidates.extend(_monitor_config_paths(_gcs_address()))
    candidates.append(str(Path("~/ray_bootstrap_config.yaml").expanduser()))
    for path in candidates:
        p = Path(path)
        if not p.is_file():
            continue
        try:
            cfg = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict) and cfg.get("available_node_types"):
            types, cap = types_from_yaml(cfg)
            return types, cap, str(p)
    return None


def read_capacity() -> Capacity:
    nodes = _alive_nodes()
    got = _types_from_gcs()
    if got is not None:
        return Capacity(nodes, got[0], got[1], source="autoscaler cluster config (GCS)")
    got_f = _types_from_files()
    if got_f is not None:
        return Capacity(nodes, got_f[0], got_f[1], source=got_f[2])
    return Capacity(nodes)


# ---------------------------------------------------------------------- acting on it


def request_workers(bundles: list[dict]) -> None:
    """Ask the autoscaler for room for these workers ([] withdraws the request)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # no autoscaler / an old one: Ray Train's own demand still counts
        pass


def ensure_capacity(what: str, min_workers: int, max_workers: int, per_worker: dict, *,
                    timeout_s: float, read: Callable[[], Capacity] = read_capacity,
                    log: Callable[[str], None] = print, poll_s: float = 1.0,
                    request: Callable[[list], None] = request_workers) -> Capacity:
    """Return once at least `min_workers` can be placed on live nodes. Refuses at once
    what can never fit (and asks the autoscaler for nothing then); asks it for
    `max_workers` when the live nodes are not enough (an elastic run grows into what
    arrives later); fails after timeout_s, withdrawing the request."""
    cap = read()
    now = cap.placeable_now(per_worker)
    if now < min_workers and (not cap.autoscaling or (
            not cap.unknown_types() and cap.placeable_eventually(per_worker) < min_workers)):
        raise UserError(cap.never_fits_message(what, min_workers, per_worker))
    if cap.autoscaling and now < max_workers:
        # The request outlives this process (it is cluster state): the driver withdraws
        # it when the run ends; a refused or timed-out start withdraws it here.
        request([dict(per_worker)] * max_workers)
    if now >= min_workers:
        return cap
    adds = [(t.name, room) for t, room, _ in cap.additions(per_worker) if room]
    log(f"raygpt: waiting for the autoscaler: {now}/{min_workers} workers of {_fmt(per_worker)} "
        f"placeable now; node types that can add them: "
        + (", ".join(f"{n} (up to {r if r != math.inf else 'any'} more)" for n, r in adds)
           or ", ".join(cap.unknown_types()))
        + f" [{cap.source}]")
    t0 = last = time.monotonic()
    while True:
        time.sleep(poll_s)
        cap = read()
        now = cap.placeable_now(per_worker)
        elapsed = time.monotonic() - t0
        if now >= min_workers:
            log(f"raygpt: {now} workers placeable after {elapsed:.0f} s")
            return cap
        if elapsed > timeout_s:
            request([])
            raise UserError(
                f"{what}={min_workers}: only {now} workers of {_fmt(per_worker)} could be placed after "
                f"waiting {timeout_s:g} s for the autoscaler (run.placement_timeout_s); check `ray status` "
                f"for failed node launches, or raise run.placement_timeout_s")
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            by_type: dict[str, int] = {}
            for n in cap.nodes:
                if n.node_type:
                    by_type[n.node_type] = by_type.get(n.node_type, 0) + 1
            log(f"raygpt: still waiting ({elapsed:.0f} s / {timeout_s:g} s): {now}/{min_workers} placeable; "
                f"nodes up by type: {by_type or '-'}")


def gpus_possible(cap: Capacity) -> bool:
    """GPUs exist now or an autoscaler node type has them."""
    if any(float(n.resources.get("GPU", 0)) > 0 for n in cap.nodes):
        return True
    return any(not t.is_head and t.max_count != 0 and float(t.resources.get("GPU", 0)) > 0
               for t in cap.node_types)
