"""Ray worker nodes in their own network namespaces: partitions and slow links on one
machine (`raygpt chaos --partition-node-at / --slow-link-at`, tests/e2e/test_partition.py).

Layout: a bridge on the host holds 10.213.K.1/24 (the head advertises it); each node is a
namespace whose veth peer is a port of that bridge, with 10.213.K.(10+i). A cut takes
the host-side port down: packets both ways are dropped (a black hole, as a real partition
is), not refused. A slow link is a tbf qdisc on both ends of the veth (this kernel has no
netem). Before anything else, `unreachable 10.213.0.0/16` is routed: without it a
link that goes down loses its route and its packets leave the machine through the
default gateway. The namespaces get no forwarding (ip_forward stays as it is), so only
the bridge's addresses are reachable from them. Needs root and iproute2 (`ip`, `tc`).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERNET = "10.213.0.0/16"
BRIDGE_PREFIX = "10.213."
# The link's name inside every namespace: gloo is told to use it (GLOO_SOCKET_IFNAME);
# it otherwise resolves the hostname to 127.0.0.1 and peers dial themselves.
NS_DEV = "rgnet0"


class NetnsError(RuntimeError):
    """Namespaces cannot be made here (one line: why)."""


def unusable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or leave out the partition/slow-link options)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network namespaces need `{tool}` (iproute2), which is not installed"
    return None


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def _used_subnets() -> set[int]:
    out = sh("ip", "-4", "-o", "addr").stdout
    return {int(w.split(".")[2]) for w in out.split() if w.startswith(BRIDGE_PREFIX)}


@dataclass
class Node:
    """One namespace with its link and the `ray start --block` running in it."""
    ns: str
    host_dev: str
    ns_dev: str
    addr: str
    temp_dir: str
    proc: subprocess.Popen | None = None
    node_id: str | None = None
    starts: int = 0

    def log(self) -> Path:
        return Path(self.temp_dir) / f"ray-start-{self.starts}.log"


@dataclass
class Fabric:
    """The bridge and its namespaced nodes; `teardown()` removes all of it, also after
    failures (every step tolerates a half-made state)."""
    tag: str = field(default_factory=lambda: f"{os.getpid() % 0x10000:04x}")
    nodes: list[Node] = field(default_factory=list)
    subnet: int | None = None

    @property
    def bridge(self) -> str:
        return f"rg{self.tag}br"

    @property
    def head_ip(self) -> str:
        return f"{BRIDGE_PREFIX}{self.subnet}.1"

    def up(self) -> "Fabric":
        why = unusable_reason()
        if why:
            raise NetnsError(why)
        if "unreachable" not in sh("ip", "route", "show", SUPERNET, "type", "unreachable").stdout:
            sh("ip", "route", "add", "unreachable", SUPERNET)  # first: nothing may leave the machine
        self.subnet = next(k for k in range(1, 255) if k not in _used_subnets())
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.head_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def add_node(self) -> Node:
        i = len(self.nodes) + 1
        n = Node(ns=f"rg{self.tag}n{i}", host_dev=f"rg{self.tag}h{i}", ns_dev=NS_DEV,
                 addr=f"{BRIDGE_PREFIX}{self.subnet}.{10 + i}", temp_dir=f"/tmp/rg{self.tag}n{i}")
        self.nodes.append(n)
        sh("ip", "netns", "add", n.ns)
        peer = f"rg{self.tag}v{i}"  # unique while on the host, renamed inside
        sh("ip", "link", "add", n.host_dev, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", n.ns)
        sh("ip", "link", "set", peer, "name", n.ns_dev, ns=n.ns)
        sh("ip", "link", "set", n.host_dev, "master", self.bridge)
        sh("ip", "link", "set", n.host_dev, "up")
        sh("ip", "addr", "add", f"{n.addr}/24", "dev", n.ns_dev, ns=n.ns)
        sh("ip", "link", "set", n.ns_dev, "up", ns=n.ns)
        sh("ip", "link", "set", "lo", "up", ns=n.ns)
        sh("ip", "route", "add", "default", "via", self.head_ip, ns=n.ns)
        Path(n.temp_dir).mkdir(parents=True, exist_ok=True)
        return n

    # ------------------------------------------------------------ Ray on a node
    def start_ray(self, n: Node, gcs_address: str, num_cpus: int = 1, resources: str = '{"w": 1}') -> None:
        """`ray start --block` in the namespace (returns at once; see joined()). Its own
        --temp-dir: raylets on one machine that start together otherwise race for the
        same socket names ("bind: Address already in use")."""
        self.kill_ray(n)
        n.starts += 1
        n.node_id = None
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = ["ip", "netns", "exec", n.ns, ray, "start", "--block", f"--address={gcs_address}",
               f"--node-ip-address={n.addr}", f"--num-cpus={num_cpus}", f"--resources={resources}",
               f"--temp-dir={n.temp_dir}", "--object-store-memory", str(100 * 1024 * 1024),
               "--disable-usage-stats"]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": n.ns_dev}  # the raylet's workers inherit it
        with open(n.log(), "w") as log:
            n.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def joined(self, n: Node) -> str | None:
        """The node id once its raylet is alive in the GCS (needs ray.init)."""
        import ray

        if n.proc is not None and n.proc.poll() is not None:
            raise NetnsError(f"ray start in {n.ns} exited {n.proc.returncode}: "
                             f"{n.log().read_text(errors='replace')[-800:]}")
        for r in ray.nodes():
            if r["Alive"] and r["NodeManagerAddress"] == n.addr:
                n.node_id = r["NodeID"]
        return n.node_id

    def wait_joined(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.joined(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise NetnsError(f"namespaced Ray nodes did not join within {timeout:.0f} s")
            time.sleep(0.5)

    def kill_ray(self, n: Node) -> None:
        """Every process in the namespace (the raylet, its workers): SIGTERM, then KILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for p in sh("ip", "netns", "pids", n.ns, check=False).stdout.split()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while pids and time.monotonic() < deadline and sh("ip", "netns", "pids", n.ns, check=False).stdout.strip():
                time.sleep(0.2)
        if n.proc is not None:
            n.proc.wait()
            n.proc = None

    def node_for(self, node_id: str | None) -> Node | None:
        return next((n for n in self.nodes if node_id and n.node_id == node_id), None)

    # ------------------------------------------------------------ faults
    def cut(self, n: Node) -> None:
        sh("ip", "link", "set", n.host_dev, "down")

    def heal(self, n: Node) -> None:
        """The link back at full speed."""
        self.unslow(n)
        sh("ip", "link", "set", n.host_dev, "up")

    def slow(self, n: Node, rate: str) -> None:
        """Both directions at `rate` (e.g. 10mbit); a full queue waits up to 400 ms."""
        for dev, ns in ((n.host_dev, None), (n.ns_dev, n.ns)):
            sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
               "latency", "400ms", ns=ns)

    def unslow(self, n: Node) -> None:
        for dev, ns in ((n.host_dev, None), (n.ns_dev, n.ns)):
            sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        for n in self.nodes:
            self.kill_ray(n)
            sh("ip", "link", "del", n.host_dev, check=False)  # takes the peer and its qdiscs with it
            sh("ip", "netns", "del", n.ns, check=False)
            shutil.rmtree(n.temp_dir, ignore_errors=True)
        sh("ip", "link", "del", self.bridge, check=False)
        if not _used_subnets():  # another fabric's links still need the catch-all
            sh("ip", "route", "del", "unreachable", SUPERNET, check=False)
        self.nodes = []
