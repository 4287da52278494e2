"""Fault injection against a real training run, with a timeline.

`Chaos` follows <run_dir>/metrics.jsonl (rank 0 logs every step when train.log_every=1)
and, when the run reaches a chosen step, kills a training worker process (SIGKILL, as
the OOM killer or a crashed CUDA context would), removes a whole node, or adds one back
(local multi-node clusters from ray.cluster_utils). It records what happened and when:
failure injected -> failure detected (Ray tore the worker group down) -> worker group
restarted -> first step after restore, and the steps lost.

`raygpt chaos` runs a scenario on a local multi-node cluster (several raylets on this
machine), e.g. `raygpt chaos --kill-worker-at 15 --remove-node-at 30 --add-node-at 40`.
With --partition-node-at / --slow-link-at the worker nodes live in network namespaces
(raygpt.train.netns; root) and their links are cut or slowed (raygpt.train.chaos_links).
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import typer

WORKERS_DIR = ".workers"  # each rank writes rank<r>.json: pid, node id (see worker.py)


@dataclass
class Action:
    kind: str  # kill-worker | sigterm-worker | freeze-worker | remove-node | add-node | preempt
    at_step: int
    rank: int = 1  # kill-worker / sigterm-worker / remove-node / preempt: the worker (or its node) to hit
    after_event: str | None = None  # also wait for this metrics.jsonl event (e.g. checkpoint_reported)
    deadline_s: float = 30.0  # preempt: the drain's deadline, when the node is taken away
    for_s: float | None = None  # storage-fault: writable again after this many seconds,
    for_steps: int | None = None  # or steps (neither: when the run ends)
    heal_after_s: float | None = None  # partition: the link returns after this (None: stays cut)
    rate: str = "10mbit"  # slow-link: the link's rate (tc tbf)
    # Instead of at_step: this many seconds after the chaos began, once the run is
    # stepping and the previous fault has recovered (a soak: raygpt.train.chaos.soak_actions).
    at_s: float | None = None
    replace: bool = False  # remove-node / preempt: a fresh node joins when the old one goes (a cloud's replacement)
    done: bool = False


@dataclass
class Timeline:
    t0: float = field(default_factory=time.time)
    events: list = field(default_factory=list)

    def add(self, name: str, **kw):
        rec = {"t": round(time.time() - self.t0, 3), "event": name, **kw}
        self.events.append(rec)
        print(f"[chaos] +{rec['t']:7.2f}s {name} {json.dumps(kw)}", flush=True)
        return rec

    def next_after(self, rec: dict, name: str) -> dict | None:
        """The first `name` logged after `rec`, by order, not by `t`: `t` is rounded to 1 ms
        and one poll can log several events (a rejoin and the fault it releases)."""
        i = next(i for i, e in enumerate(self.events) if e is rec)
        return next((e for e in self.events[i + 1:] if e["event"] == name), None)


def read_workers(run_dir: Path) -> dict[int, dict]:
    out = {}
    for f in (run_dir / WORKERS_DIR).glob("rank*.json"):
        try:
            d = json.loads(f.read_text())
            out[d["rank"]] = d
        except (ValueError, KeyError):
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class Chaos:
    def __init__(self, run_dir: str | os.PathLike, actions: list[Action], cluster=None,
                 timeline: Timeline | None = None, fabric=None):
        self.run_dir = Path(run_dir)
        self.actions = sorted(actions, key=lambda a: a.at_step)
        self.cluster = cluster
        self.timeline = timeline or Timeline()
        from raygpt.train.chaos_links import LinkFaults  # namespaced nodes (raygpt.train.netns)

        self.links = LinkFaults(self, fabric, cluster.address) if fabric is not None else None
        self._pos = 0
        self._step = 0
        self._starts = 0
        self._pending: list[dict] = []  # injected failures awaiting recovery figures
        self._victims: set[int] = set()
        self._seen_events: set[str] = set()
        self._reclaims: list[tuple[float, object, bool]] = []  # (when, node, replace): preempted nodes to take away
        self._faults: list[tuple[object, Action, float, int]] = []  # (ReadOnly, action, since, step)
        self._ckpt_failed = False  # a checkpoint failed and none succeeded since
        self._stepping = False  # a step was logged since the last group start or fault

    # ---------------------------------------------------------------- following
    def _read_new(self) -> list[dict]:
        p = self.run_dir / "metrics.jsonl"
        if not p.exists():
            return []
        with open(p) as f:
            f.seek(self._pos)
            chunk = f.read()
            # keep a partial last line for the next read
            cut = chunk.rfind("\n") + 1
            self._pos += len(chunk[:cut].encode())
        out = []
        for line in chunk[:cut].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out

    def poll(self) -> None:
        for r in self._read_new():
            if r.get("event") == "start":
                self._starts += 1
                self._stepping = False
                if self._starts > 1:
                    self.timeline.add("worker group restarted", restored_step=r["step"],
                                      world_size=r["world_size"], accum=r.get("accum"),
                                      plan=r.get("plan"))
                    for p in self._pending:
                        p.setdefault("restored_step", r["step"])
                        p.setdefault("restart_t", time.time())
                        p.setdefault("last_step", self._step)  # the furthest step before it
                continue
            if "event" in r:
                self._seen_events.add(r["event"])
            if r.get("event") == "hang":
                self.timeline.add("hang detected", step=r.get("step"), stuck=[x["rank"] for x in r.get("stuck", [])],
                                  reason=r.get("reason"), idle_s=r.get("idle_s"))
                for p in self._pending:
                    p.setdefault("hang_t", time.time())
            elif r.get("event") == "preemption":
                rec = self.timeline.add("drain notice reached the workers", step=r["step"],
                                        nodes=len(r.get("nodes") or []), deadline_left_s=r.get("deadline_left_s"))
                if not self._pending:  # a drain chaos did not make (the straggler policy): time the move too
                    self._pending.append({**rec, "t": time.time(), "step": r["step"],
                                          "old_pids": [w["pid"] for w in read_workers(self.run_dir).values()]})
            elif r.get("event") == "preemption_checkpoint":
                self.timeline.add("checkpoint committed before the move", step=r["step"],
                                  deadline_left_s=r.get("deadline_left_s"))
            elif r.get("event") == "straggler":
                self.timeline.add("straggler flagged", step=r["step"], rank=r["rank"], ratio=r["ratio"],
                                  kind=r.get("kind", "compute"), **({"rtt_ms": r["rtt_ms"]} if "rtt_ms" in r else {}))
            elif r.get("event") == "await-grow":
                self.timeline.add("holding for grow-back", step=r["step"], world_size=r["world_size"],
                                  want=r["want"])
            elif r.get("event") in ("checkpoint_failed", "checkpoint", "checkpoint_reported"):
                self._checkpoint_event(r)
            elif r.get("event") == "replica_joined":
                self._replica_joined(r)
            elif r.get("event") == "await-grow-timeout":
                self.timeline.add("grow-back did not come", step=r["step"], world_size=r["world_size"],
                                  timeout_s=r["timeout_s"])
            if "event" in r or "step" not in r:
                continue
            self._step = r["step"]
            self._stepping = True
            self._survivors_stepped(r)
            for p in self._pending:
                if "restart_t" in p and "first_step_t" not in p and r["step"] > p["restored_step"]:
                    p["first_step_t"] = time.time()
                    # steps computed twice: the furthest step reached before the restart
                    # minus the step it restored (a drain's checkpoint: 0)
                    lost = max(0, p.get("last_step", p["step"]) - p["restored_step"])
                    rec = self.timeline.add(
                        "first step after restore", step=r["step"], world_size=r.get("world_size"),
                        recovery_s=round(p["first_step_t"] - p["t"], 3), steps_lost=lost)
                    p["summary"] = rec
        self._pending = [p for p in self._pending if "first_step_t" not in p or "reported" in p]
        self._watch_injected_hang()
        # failure detection: every process of the old group is gone
        for p in self._pending:
            if "detected_t" not in p and p.get("old_pids") and not any(_alive(x) for x in p["old_pids"]):
                p["detected_t"] = time.time()
                self.timeline.add("failure detected (old worker group gone)",
                                  after_s=round(p["detected_t"] - p["t"], 3))
        self._reclaim_due()
        if self.links is not None:
            self.links.due()
        self._storage_due()
        for a in self.actions:
            if not a.done and self._ready(a):
                self._do(a)

    # run.fault_tolerance=replica: no group restart; the survivors' next step and the
    # replacement's return (a `replica_joined` from it) time the fault instead.
    def _survivors_stepped(self, r: dict) -> None:
        for p in self._pending:
            if "survivors_t" not in p and r.get("replicas") is not None and r["step"] > p["step"] \
                    and r.get("time", 0) > p["t"]:
                p["survivors_t"] = r["time"]
                self.timeline.add("survivors stepped", step=r["step"], replicas=r["replicas"],
                                  after_s=round(r["time"] - p["t"], 3))

    def _replica_joined(self, r: dict) -> None:
        p = next((p for p in self._pending if "first_step_t" not in p), None)
        rec = self.timeline.add("replica rejoined", step=r["step"], replica=r.get("replica"),
                                heal_s=r.get("heal_s"), **({"after_s": round(r["time"] - p["t"], 3)} if p else {}))
        if p is not None:
            p["first_step_t"], p["summary"] = r["time"], rec

    def _ready(self, a: Action) -> bool:
        if a.at_s is not None:  # timed: only into a run that is stepping, one fault at a time
            return (time.time() - self.timeline.t0 >= a.at_s and self._stepping and not self._pending
                    and not self._reclaims)
        return self._step >= a.at_step and (a.after_event is None or a.after_event in self._seen_events)

    def _watch_injected_hang(self) -> None:
        """A worker-side hang (inject["hang_at"]) leaves a marker when it starts: the
        failure's time and step, for the recovery figures."""
        marker = self.run_dir / ".hang_at-injected"
        if getattr(self, "_hang_seen", False) or not marker.exists():
            return
        self._hang_seen = True
        step = int(marker.read_text() or 0)
        workers = read_workers(self.run_dir)
        rec = self.timeline.add("failure injected: training thread hung", step=step)
        # the hang starts in the data phase of `step`, after step - 1 completed
        self._pending.append({**rec, "t": marker.stat().st_mtime, "step": step - 1,
                              "old_pids": [w["pid"] for w in workers.values()]})

    # ---------------------------------------------------------------- actions
    # kill-worker: SIGKILL, as the OOM killer or a crashed CUDA context would;
    # sigterm-worker: a spot reclaim / node drain, which checkpoints first;
    # freeze-worker: SIGSTOP, a process that stops answering (a hung driver call, a
    # node swapping to death); only the hang watchdog gets the run past it.
    _SIGNALS = {"kill-worker": (signal.SIGKILL, "failure injected: worker killed"),
                "sigterm-worker": (signal.SIGTERM, "SIGTERM sent to a worker"),
                "freeze-worker": (signal.SIGSTOP, "failure injected: worker frozen")}

    def _do(self, a: Action) -> None:
        a.done = True
        self._stepping = False
        workers = read_workers(self.run_dir)
        old_pids = [w["pid"] for w in workers.values()]
        if a.kind in self._SIGNALS:
            sig, what = self._SIGNALS[a.kind]
            w = workers.get(a.rank) or workers.get(max(workers)) if workers else None
            if w is None:
                self.timeline.add(f"{a.kind} skipped: no worker pids known", step=self._step)
                return
            try:
                os.kill(w["pid"], sig)
            except ProcessLookupError:  # it exited since it registered (a replacement still starting)
                self.timeline.add(f"{a.kind} skipped: rank {w['rank']}'s pid {w['pid']} is gone", step=self._step)
                return
            rec = self.timeline.add(what, step=self._step, rank=w["rank"], pid=w["pid"])
            self._pending.append({**rec, "t": time.time(), "step": self._step, "old_pids": old_pids})
        elif a.kind == "remove-node":
            node = self._node_of(workers.get(a.rank))
            if node is None:
                self.timeline.add("remove-node skipped: no removable node", step=self._step)
                return
            self.cluster.remove_node(node, allow_graceful=False)
            rec = self.timeline.add("failure injected: node removed", step=self._step,
                                    node=node.unique_id[:12])
            self._pending.append({**rec, "t": time.time(), "step": self._step, "old_pids": old_pids})
            if a.replace:
                self._replace_node()
        elif a.kind == "add-node":
            self.cluster.add_node(**self.node_args)
            self.timeline.add("node added", step=self._step)
        elif a.kind == "storage-fault":
            self._storage_fault(a)
        elif a.kind in ("partition", "slow-link"):
            self.links.do(a, workers)
        elif a.kind == "preempt":
            self._preempt(a, workers, old_pids)

    def _preempt(self, a: Action, workers: dict, old_pids: list) -> None:
        """A cloud's preemption: drain the node with a deadline (what autoscalers do on
        a spot notice), then take the node away at the deadline."""
        from raygpt import raycompat

        node = self._node_of(workers.get(a.rank))
        if node is None:
            self.timeline.add("preempt skipped: no removable node", step=self._step)
            return
        ok, why = raycompat.drain_node(node.node_id, "preemption", "raygpt chaos: preemption", a.deadline_s)
        rec = self.timeline.add("preemption notice: node drained", step=self._step, node=node.node_id[:12],
                                deadline_s=a.deadline_s, accepted=ok, **({"why": why} if why else {}))
        self._pending.append({**rec, "t": time.time(), "step": self._step, "old_pids": old_pids})
        self._reclaims.append((time.time() + a.deadline_s, node, a.replace))

    def _reclaim_due(self) -> None:
        now = time.time()
        for x in [x for x in self._reclaims if x[0] <= now]:
            self._reclaims.remove(x)
            _, node, replace = x
            if node in list(self.cluster.worker_nodes):
                try:
                    self.cluster.remove_node(node, allow_graceful=False)
                except Exception:  # its raylet left by itself once the drained node was idle
                    pass
            self.timeline.add("deadline passed: preempted node taken away", step=self._step,
                              node=node.node_id[:12])
            if replace:
                self._replace_node()

    def _replace_node(self) -> None:
        self.cluster.add_node(**self.node_args)
        self.timeline.add("replacement node added", step=self._step)

    def _storage_fault(self, a: Action) -> None:
        """The run directory (checkpoints, metrics, summary) read-only for every process
        on this machine (raygpt.train.storage_faults), writable again after a.for_s
        seconds or a.for_steps steps."""
        from raygpt.errors import UserError
        from raygpt.train.storage_faults import ReadOnly

        fault = ReadOnly(self.run_dir)
        try:
            fault.apply()
        except UserError as e:
            self.timeline.add("storage-fault skipped", step=self._step, why=str(e))
            return
        self._faults.append((fault, a, time.time(), self._step))
        until = {"for_s": a.for_s} if a.for_s is not None else {"for_steps": a.for_steps}
        self.timeline.add("failure injected: storage made read-only", step=self._step, path=str(fault.path),
                          **until)

    def _storage_due(self) -> None:
        for f in list(self._faults):
            fault, a, since, step = f
            if (a.for_s is not None and time.time() - since >= a.for_s) or \
                    (a.for_steps is not None and self._step - step >= a.for_steps):
                self._writable(f)

    def _writable(self, f) -> None:
        fault, a, since, step = f
        self._faults.remove(f)
        fault.undo()
        self.timeline.add("storage writable again", step=self._step, read_only_s=round(time.time() - since, 3),
                          read_only_steps=self._step - step)

    def undo_faults(self) -> None:
        """Whatever storage fault is still on is taken off (runs on every exit path)."""
        for f in list(self._faults):
            self._writable(f)

    def _checkpoint_event(self, r: dict) -> None:
        """A failed save, and the first one that succeeds after it (a sync save is done at
        its `checkpoint` event, an async one at `checkpoint_reported`)."""
        ev = r["event"]
        if ev == "checkpoint_failed":
            self._ckpt_failed = True
            self.timeline.add("checkpoint failed", step=r["step"], error=r.get("error"))
        elif self._ckpt_failed and (ev == "checkpoint_reported" or not r.get("asynchronous")):
            self._ckpt_failed = False
            self.timeline.add("checkpoint saved after the failure", step=r["step"])

    node_args: dict = {"num_cpus": 1, "resources": {"w": 1}}

    def _node_of(self, worker: dict | None):
        if self.cluster is None:
            return None
        nodes = list(self.cluster.worker_nodes)
        if worker is not None:
            for n in nodes:
                if n.node_id == worker.get("node_id"):
                    return n
        return nodes[-1] if nodes else None

    def follow(self, done: threading.Event, interval: float = 0.05) -> None:
        try:
            while not done.is_set():
                self.poll()
                done.wait(interval)
            self.poll()
        finally:  # a read-only mount never outlives the follower (errors, Ctrl-C included)
            self.undo_faults()

    def recoveries(self) -> list[dict]:
        return [e for e in self.timeline.events if e["event"] == "first step after restore"]


def run_with_chaos(cfg, actions: list[Action], cluster=None, timeline: Timeline | None = None,
                   inject: dict | None = None, fabric=None):
    """Run training in a thread; inject `actions` from this (main) thread, where
    Cluster.add_node/remove_node must be called. `inject`: worker-side fault-injection
    keys (e.g. await_world; raygpt.train.faults lists them). Returns (summary, chaos, error)."""
    from raygpt.train.launch import RunPaths, resolve_storage, run_training

    run_dir = RunPaths.resolve(resolve_storage(cfg), cfg.run.name).run_dir
    chaos = Chaos(run_dir, actions, cluster=cluster, timeline=timeline, fabric=fabric)
    result: dict = {}
    done = threading.Event()

    def target():
        try:
            result["summary"] = run_training(cfg, progress=False, inject=inject)
        except BaseException as e:  # reported to the caller
            result["error"] = e
        finally:
            done.set()

    th = threading.Thread(target=target, daemon=True)
    th.start()
    chaos.follow(done)
    th.join()
    chaos.timeline.add("run finished", ok="error" not in result)
    return result.get("summary"), chaos, result.get("error")


# -------------------------------------------------------------------- local clusters


def chaos_env() -> None:
    """What a chaos run's driver (and the raylets it starts) need in the environment."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # The same worker-group start timeout as `raygpt train` (the raylets inherit it): a
    # lost node is not waited for (raygpt.train.elastic), so it never runs out.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                          os.environ.get("RAYGPT_CHAOS_START_TIMEOUT_S", "300"))
    # Tearing a group down waits this long for every rank's destroy_process_group (30 s
    # by default); a rank behind a cut link never answers, and this wait was half the
    # partition's recovery time. The controller reads it from the head's environment.
    os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5")


def head_args(node_dead_after_s: float | None = None, **args) -> dict:
    """A chaos head's arguments: 1 CPU, and with `node_dead_after_s` Ray's node health
    check tightened so that a node that stops answering is declared dead after about
    that long (Ray's own default: 5 checks of up to 10 s, 3 s apart, ~50-65 s on a cut
    link). A node must be declared dead before a healed one can rejoin as a new node."""
    args = {"num_cpus": 1, **args}
    if node_dead_after_s is not None:
        args["_system_config"] = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                                  "health_check_timeout_ms": 1000,
                                  "health_check_failure_threshold": max(1, round(node_dead_after_s / 2))}
    return args


def local_cluster(nodes: int, node_dead_after_s: float | None = None):
    """A head (1 CPU, no training) and `nodes` worker nodes of 1 CPU and resource "w",
    all raylets on this machine (ray.cluster_utils)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head_args(node_dead_after_s))
    try:
        for _ in range(nodes):
            cluster.add_node(**Chaos.node_args)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


SOAK_KINDS = ("kill-worker", "freeze-worker", "remove-node", "preempt")


def soak_actions(minutes: float, every_min: float, kinds=SOAK_KINDS, deadline_s: float = 30.0) -> list[Action]:
    """One fault per `every_min` minutes for `minutes`, each in the middle of its period,
    cycling through `kinds`; a lost or preempted node is replaced (as a cloud would)."""
    period = every_min * 60
    return [Action(kinds[i % len(kinds)], 0, at_s=period * (i + 0.5), deadline_s=deadline_s, replace=True)
            for i in range(int(minutes // every_min))]


# -------------------------------------------------------------------- CLI


def _check_link_faults(node_actions) -> None:
    """Before any cluster starts: one line when link faults cannot run here."""
    from raygpt.errors import UserError
    from raygpt.train.netns import unusable_reason

    why = unusable_reason()
    if why:
        raise UserError(f"--partition-node-at/--slow-link-at: {why}")
    if node_actions:
        raise UserError("--partition-node-at/--slow-link-at put the worker nodes in network namespaces; "
                        "--remove-node-at/--add-node-at/--preempt-node-at act on in-process nodes: use one kind per run")


def chaos_cmd(
    preset: str = typer.Option("debug", "--preset", "-p"),
    config: Optional[str] = typer.Option(None, "--config", "-c"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s"),
    nodes: int = typer.Option(2, "--nodes", help="worker nodes (1 CPU + resource 'w' each)"),
    workers: str = typer.Option("1:2", "--num-workers", "-n", help="N or MIN:MAX (elastic)"),
    steps: int = typer.Option(60, "--steps"),
    kill_worker_at: List[int] = typer.Option([], "--kill-worker-at", help="step(s) to SIGKILL a worker"),
    freeze_worker_at: List[int] = typer.Option([], "--freeze-worker-at", help="step(s) to SIGSTOP a worker"),
    hang_worker_at: Optional[int] = typer.Option(
        None, "--hang-worker-at", help="step at which a worker's training thread blocks for good (process alive)"),
    slow_worker_at: Optional[int] = typer.Option(
        None, "--slow-worker-at", help="step from which a worker runs --slow-factor times slower"),
    slow_factor: float = typer.Option(2.0, "--slow-factor"),
    remove_node_at: List[int] = typer.Option([], "--remove-node-at", help="step(s) to remove a node"),
    preempt_node_at: List[int] = typer.Option(
        [], "--preempt-node-at", help="step(s) to drain a worker's node with a deadline (a spot/preemption "
                                      "notice); the node is taken away at the deadline"),
    preempt_deadline: float = typer.Option(30.0, "--preempt-deadline", help="seconds from the notice to the reclaim"),
    add_node_at: List[int] = typer.Option([], "--add-node-at", help="step(s) to add a node back"),
    storage_fault_at: List[int] = typer.Option(
        [], "--storage-fault-at", help="step(s) at which the run directory turns read-only (root: a read-only "
                                       "bind mount); checkpoints fail, training goes on"),
    storage_fault_for: float = typer.Option(10.0, "--storage-fault-for",
                                            help="seconds until the storage is writable again"),
    partition_node_at: Optional[int] = typer.Option(
        None, "--partition-node-at", help="step at which the link of rank 1's node is cut (a network partition; "
                                          "worker nodes in network namespaces, root only)"),
    partition_for: Optional[float] = typer.Option(
        None, "--partition-for", help="seconds until the link returns, and not before the run went on without the "
                                      "node (a node Ray declared dead rejoins with a fresh `ray start`); "
                                      "default: stays cut"),
    slow_link_at: Optional[int] = typer.Option(
        None, "--slow-link-at", help="step from which the link of rank 1's node runs at --link-rate (namespaces, root)"),
    link_rate: str = typer.Option("10mbit", "--link-rate", help="rate of the slowed link (tc tbf, e.g. 10mbit)"),
    out: str = typer.Option("runs/chaos", "--out", help="storage dir; timeline.json goes in the run dir"),
    max_failures: int = typer.Option(5, "--max-failures"),
    resize_interval: float = typer.Option(5.0, "--resize-interval", help="elastic resize check period (s)"),
    await_grow_at: Optional[int] = typer.Option(
        None, "--await-grow-at",
        help="step at which training holds (after a checkpoint) until Ray's elastic resize has grown "
             "the group back to MAX; default: the last --add-node-at step (none without one)"),
    await_timeout: float = typer.Option(300.0, "--await-timeout",
                                        help="longest hold at --await-grow-at before going on (s)"),
    node_dead_after: Optional[float] = typer.Option(
        None, "--node-dead-after", help="seconds of silence after which Ray declares a node dead (its health "
                                        "check, tightened); default: Ray's own (~50-65 s on a cut link)"),
):
    """Train on a local multi-node Ray cluster while killing workers / removing and
    adding nodes at chosen steps; print the recovery timeline."""
    import ray
    from ray.cluster_utils import Cluster

    from raygpt.train.runconfig import build_run_config

    if not (partition_node_at is not None or slow_link_at is not None or kill_worker_at or freeze_worker_at or remove_node_at or add_node_at or hang_worker_at
            or slow_worker_at or preempt_node_at or storage_fault_at):
        kill_worker_at = [steps // 3]
    name = f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"
    sets = ["train.log_every=1", f"train.max_steps={steps}", f"run.elastic_resize_interval_s={resize_interval}",
            "run.cpus_per_worker=1", *(set_ or [])]
    cfg = build_run_config(config, None if config else preset, sets, num_workers=workers, storage=out, name=name,
                           max_failures=max_failures, resources='{"w": 1}')
    actions = ([Action("kill-worker", s) for s in kill_worker_at]
               + [Action("freeze-worker", s) for s in freeze_worker_at]
               + [Action("remove-node", s) for s in remove_node_at]
               + [Action("preempt", s, deadline_s=preempt_deadline) for s in preempt_node_at]
               + [Action("add-node", s) for s in add_node_at]
               + [Action("storage-fault", s, for_s=storage_fault_for) for s in storage_fault_at])
    if storage_fault_at:
        from raygpt.train.storage_faults import check_root

        check_root("--storage-fault-at")  # before a cluster starts
    fabric_needed = partition_node_at is not None or slow_link_at is not None
    if fabric_needed:
        _check_link_faults(remove_node_at or add_node_at or preempt_node_at)
        actions += [Action("partition", s, heal_after_s=partition_for) for s in [partition_node_at] if s is not None]
        actions += [Action("slow-link", s, rate=link_rate) for s in [slow_link_at] if s is not None]
    inject = {}
    if hang_worker_at is not None:
        inject["hang_at"] = {"step": hang_worker_at, "rank": 1}
    if slow_worker_at is not None:
        inject["slow"] = {"step": slow_worker_at, "rank": 1, "factor": slow_factor}
    if await_grow_at is None and add_node_at:
        await_grow_at = max(add_node_at)
    if await_grow_at is not None:
        # The grow-back is awaited, not raced: without this a fast machine reaches the
        # last step before Ray's next resize check sees the new node.
        inject["await_world"] = {"step": await_grow_at, "world": cfg.run.num_workers,
                                 "timeout_s": await_timeout}
    chaos_env()
    fabric = None
    if fabric_needed:
        from raygpt.train.chaos_links import start_fabric

        fabric, cluster = start_fabric(nodes, lambda ip: Cluster(
            initialize_head=True, head_node_args=head_args(node_dead_after, node_ip_address=ip)))
    else:
        cluster = local_cluster(nodes, node_dead_after)
    try:
        cluster.wait_for_nodes()
        from raygpt.train.launch import init_ray

        init_ray(cluster.address)
        if fabric is not None:
            fabric.wait_joined()
        timeline = Timeline()
        timeline.add("cluster up", nodes=nodes + 1, **({"namespaces": [n.ns for n in fabric.nodes]} if fabric else {}))
        summary, chaos, err = run_with_chaos(cfg, actions, cluster=cluster, timeline=timeline, inject=inject,
                                             fabric=fabric)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if fabric is not None:
            fabric.teardown()
    run_dir = Path(out).resolve() / name
    from raygpt.train.metrics import write_json_atomic

    write_json_atomic(run_dir / "timeline.json", {"events": chaos.timeline.events, "summary": summary})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"raygpt chaos: {run_dir}")
    for col in ("t (s)", "event", "details"):
        t.add_column(col)
    for e in chaos.timeline.events:
        d = {k: v for k, v in e.items() if k not in ("t", "event")}
        t.add_row(f"{e['t']:.2f}", e["event"], ", ".join(f"{k}={v}" for k, v in d.items()))
    Console().print(t)
    if err is not None:
        raise err
