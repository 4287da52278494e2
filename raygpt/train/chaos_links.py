"""Link faults for `raygpt chaos` on worker nodes in network namespaces
(raygpt.train.netns): a partition of the node hosting a rank (its link cut; healed after
`heal_after_s` seconds, when a node Ray declared dead rejoins with a fresh `ray start`), and a
slow link (tbf at a rate).
"""
from __future__ import annotations

import time

from raygpt.train.netns import Fabric, NetnsError, Node

REJOIN_POLL_S = 1.0
HEAL_WAIT_LIMIT_S = 120.0  # the longest a due heal waits for the run to recover


def start_fabric(n_nodes: int, start_head) -> tuple[Fabric, object]:
    """The bridge, then the head (`start_head(node_ip)` -> a cluster_utils.Cluster on the
    bridge's address), then `n_nodes` namespaced worker nodes joined to it. On any
    failure everything made so far is removed before the error goes up."""
    fabric = Fabric()
    cluster = None
    try:
        fabric.up()
        cluster = start_head(fabric.head_ip)
        for _ in range(n_nodes):
            fabric.start_ray(fabric.add_node(), cluster.address)
        return fabric, cluster
    except BaseException:
        if cluster is not None:
            cluster.shutdown()
        fabric.teardown()
        raise


class LinkFaults:
    """The partition / slow-link actions of one Chaos, and the heal and rejoin after."""

    def __init__(self, chaos, fabric: Fabric, gcs_address: str):
        self.chaos, self.fabric, self.gcs = chaos, fabric, gcs_address
        self._heals: list[tuple[float, Node, float]] = []  # (when, node, cut time)
        self._rejoins: list[dict] = []                     # healed nodes on their way back
        self._next_poll = 0.0

    def _node(self, a, workers: dict) -> Node | None:
        w = workers.get(a.rank)
        node = self.fabric.node_for(w.get("node_id") if w else None)
        if node is None:
            self.chaos.timeline.add(f"{a.kind} skipped: rank {a.rank}'s node is not in a namespace",
                                    step=self.chaos._step)
        return node

    def do(self, a, workers: dict) -> None:
        node = self._node(a, workers)
        if node is None:
            return
        tl, step = self.chaos.timeline, self.chaos._step
        if a.kind == "slow-link":
            self.fabric.slow(node, a.rate)
            tl.add("link slowed", step=step, rank=a.rank, node=node.node_id[:12], rate=a.rate)
            return
        self.fabric.cut(node)
        now = time.time()
        rec = tl.add("failure injected: link cut", step=step, rank=a.rank, node=node.node_id[:12], ns=node.ns)
        # The cut node's processes live on (unreachable): the group is gone when the others are.
        survivors = [w["pid"] for w in workers.values() if w.get("node_id") != node.node_id]
        self.chaos._pending.append({**rec, "t": now, "step": step, "old_pids": survivors})
        if a.heal_after_s is not None:
            self._heals.append((now + a.heal_after_s, node, now))

    def _recovered_since(self, t: float) -> bool:
        tl = self.chaos.timeline
        return any(e["event"] == "first step after restore" and tl.t0 + e["t"] > t for e in tl.events)

    def due(self) -> None:
        now = time.time()
        # The link returns at its time, but not before the run has gone on without the
        # node (else a fast heal races the restart: which world size it restarts at
        # would depend on the machine's speed); a run that never recovers gets it back
        # HEAL_WAIT_LIMIT_S late.
        for h in [h for h in self._heals
                  if h[0] <= now and (self._recovered_since(h[2]) or now >= h[0] + HEAL_WAIT_LIMIT_S)]:
            self._heals.remove(h)
            _, node, cut_t = h
            self.fabric.heal(node)
            self.chaos.timeline.add("link healed", step=self.chaos._step, node=node.node_id[:12],
                                    cut_s=round(now - cut_t, 1))
            self._rejoins.append({"node": node, "old_id": node.node_id, "healed_t": now})
        if self._rejoins and now >= self._next_poll:
            self._next_poll = now + REJOIN_POLL_S
            for r in list(self._rejoins):
                self._rejoin(r, now)

    def _rejoin(self, r: dict, now: float) -> None:
        """A node Ray declared dead cannot come back as the same raylet (it exits when it
        hears so): once it is gone, a fresh `ray start` in the namespace; done when the
        new node is alive."""
        import ray

        node, tl = r["node"], self.chaos.timeline
        if "started_t" not in r:
            dead = not any(n["NodeID"] == r["old_id"] and n["Alive"] for n in ray.nodes())
            if dead or node.proc is None or node.proc.poll() is not None:
                self.fabric.start_ray(node, self.gcs)
                r["started_t"] = now
                tl.add("fresh ray start in the namespace (the old raylet was declared dead)",
                       step=self.chaos._step, ns=node.ns)
            return
        try:
            new_id = self.fabric.joined(node)
        except NetnsError as e:
            tl.add("rejoin failed", step=self.chaos._step, why=str(e)[:300])
            self._rejoins.remove(r)
            return
        if new_id:
            tl.add("node rejoined", step=self.chaos._step, node=new_id[:12],
                   after_heal_s=round(now - r["healed_t"], 1))
            self._rejoins.remove(r)
