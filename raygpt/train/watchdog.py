"""The hang watchdog: a driver thread that reads every rank's heartbeat
(raygpt.train.heartbeat) once a second and declares a hang when no rank of the current
worker group has made progress for the timeout of its phase.

Two-phase timeouts (torchtitan's idea): before the group's first step, and while a rank
evaluates or saves, `run.init_timeout_s` (compile, data, process-group set-up); after
it, `run.hang_timeout_s`, by default max(15 s, 20 x the slowest step seen), so a small
model is judged in seconds and a large one is not killed for being large.

The verdict names the stuck ranks: those whose heartbeat stopped (a frozen process), else
those behind the others (same step, an earlier phase: the ones the others wait for). It
goes to Ray's KV store, where every rank's publisher picks it up (stacks, exit), and to
metrics.jsonl as a `hang` event. Progress is timed by this process's clock, when a value
changed, so clocks of other nodes do not matter.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from raygpt import raycompat
from raygpt.train.heartbeat import (BEAT_S, LONG_PHASES, NAMESPACE, STALE_BEAT_S, newest_per_rank, position,
                                    read_beats, stop_thread, verdict_key)

# No heartbeat this long while the other ranks are past start-up and in a step (not a
# save or an eval): a frozen process, judged without waiting out the hang timeout (a
# soak under load had auto timeouts of 25-38 s: 20 x its slowest step). A live process
# beats from its own thread every second whatever its training thread does.
FROZEN_S = 10.0
MIN_HANG_S = 15.0      # the auto timeout's floor
STEP_FACTOR = 20.0     # the auto timeout: this many slowest steps


@dataclass
class _Seen:
    rec: dict
    beat_t: float      # when its seq last changed (our clock)
    progress_t: float  # when its ticks last changed

    def saw(self, r: dict, now: float) -> None:
        """Its newest record `r`, read at `now`."""
        if r["seq"] != self.rec["seq"]:
            self.beat_t = now
        if r["ticks"] != self.rec["ticks"]:
            self.progress_t = now
        self.rec = r


@dataclass
class HangWatchdog:
    run_id: str
    run_dir: Path
    hang_timeout_s: float | None = None
    init_timeout_s: float = 600.0
    poll_s: float = 1.0
    on_verdict: object = None  # callable(verdict) for the driver's own record
    verdicts: list = field(default_factory=list)
    links: object = None       # a raygpt.train.links.LinkStragglerDetector fed the same beats
    on_link: object = None     # callable(event) per slow link it flags

    def __post_init__(self):
        self._seen: dict[int, _Seen] = {}
        self._gen: str | None = None
        self._judged: set[str] = set()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, name="raygpt-watchdog", daemon=True)

    # ---------------------------------------------------------------- thread
    def start(self) -> "HangWatchdog":
        if self.hang_timeout_s != 0:
            self._th.start()
        return self

    def stop(self) -> None:
        stop_thread(self._stop, self._th, f"hb:{self.run_id}:", f"hang:{self.run_id}:", prefix=True)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                verdict = self.check(self._read(), time.monotonic())
                if verdict is not None:
                    self._publish(verdict)
                self._check_links()
            except Exception as e:  # the watchdog must never take the run down
                sys.stderr.write(f"raygpt: hang watchdog skipped a check: {e}\n")

    def _read(self) -> list[dict]:
        return read_beats(self.run_id)

    def _latest(self) -> list[_Seen]:
        """What was last seen of each rank (the slow-link check reads their records)."""
        return list(self._seen.values())

    def _check_links(self) -> None:
        if self.links is None:
            return
        for ev in self.links.update([s.rec for s in self._latest()]):
            if self.on_link is not None:
                self.on_link(ev)

    # ---------------------------------------------------------------- judgement
    def _current(self, recs: list[dict], now: float) -> list[_Seen]:
        """The newest group's ranks (a restart leaves the old group's keys behind until
        each rank is overwritten), with the times their values last changed."""
        if not recs:
            return []
        gen = max(recs, key=lambda r: r["started"])["gen"]
        if gen != self._gen:
            self._gen, self._seen = gen, {}
        cur = [r for r in recs if r["gen"] == gen]
        for r in cur:
            old = self._seen.get(r["rank"])
            if old is None:
                self._seen[r["rank"]] = _Seen(r, now, now)
            else:
                old.saw(r, now)
        return list(self._seen.values())

    def timeout(self, ranks: list[_Seen], now: float) -> float:
        # A frozen rank's last record says where it was a beat before it froze (maybe
        # still "init" when steps are fast): the live ranks say which phase the group is in.
        live = [s for s in ranks if now - s.beat_t < STALE_BEAT_S] or ranks
        recs = [s.rec for s in live]
        if any(r["steps_done"] == 0 for r in recs):
            return self.init_timeout_s
        step_limit = self.hang_timeout_s or max(MIN_HANG_S, STEP_FACTOR * max(r["step_s_max"] for r in recs))
        # A rank in a long phase (a save, an eval) still beats: one whose beats stopped
        # (frozen, or behind a cut link) while the others save is judged as in a step.
        if any(r["phase"] in LONG_PHASES for r in recs) and len(live) == len(ranks):
            return self.init_timeout_s
        return step_limit

    def check(self, recs: list[dict], now: float) -> dict | None:
        ranks = self._current(recs, now)
        if not ranks or self._gen in self._judged or len(ranks) < ranks[0].rec["world"]:
            return None
        if all(now - s.beat_t >= STALE_BEAT_S for s in ranks):
            return None  # the whole group gone (or frozen): Ray's health check has it
        idle = now - max(s.progress_t for s in ranks)
        limit = self.timeout(ranks, now)
        if idle < limit and not self._frozen_in_a_step(ranks, now):
            return None
        verdict = self._verdict(ranks, now, idle, limit)
        self._judged.add(self._gen)
        self.verdicts.append(verdict)
        return verdict

    @staticmethod
    def _frozen_in_a_step(ranks: list[_Seen], now: float) -> bool:
        silent = [s for s in ranks if now - s.beat_t >= FROZEN_S]
        live = [s.rec for s in ranks if now - s.beat_t < STALE_BEAT_S]
        return bool(silent and live) and all(r["steps_done"] > 0 and r["phase"] not in LONG_PHASES for r in live)

    def _verdict(self, ranks: list[_Seen], now: float, idle: float, limit: float) -> dict:
        frozen = [s for s in ranks if now - s.beat_t >= STALE_BEAT_S]
        if frozen:
            stuck, why = frozen, "no heartbeat (process frozen)"
        else:
            low = min(position(s.rec) for s in ranks)
            stuck = [s for s in ranks if position(s.rec) == low]
            why = ("behind the others" if len(stuck) < len(ranks)
                   else "every rank at the same place (see the stacks)")
        n = len(self.verdicts) + 1
        return {
            "gen": self._gen, "idle_s": round(idle, 1), "timeout_s": round(limit, 1), "reason": why,
            "step": min(s.rec["step"] for s in ([r for r in ranks if r not in frozen] or ranks)), "dir": str(self.run_dir / "hangs" / f"{n:03d}"),
            "stuck": [{"rank": s.rec["rank"], "pid": s.rec["pid"], "node": s.rec["node"], "step": s.rec["step"],
                       "phase": s.rec["phase"], "last_beat_s": round(now - s.beat_t, 1)} for s in stuck],
        }

    def _publish(self, verdict: dict) -> None:
        raycompat.kv_put(verdict_key(self.run_id, verdict["gen"]), json.dumps(verdict), namespace=NAMESPACE)
        who = ", ".join(f"rank {s['rank']} (pid {s['pid']}, node {s['node'][:8]}, step {s['step']}, "
                        f"{s['phase']})" for s in verdict["stuck"])
        sys.stderr.write(f"raygpt: hang: no progress for {verdict['idle_s']:.0f} s (limit {verdict['timeout_s']:.0f} s)"
                         f"; stuck: {who}: {verdict['reason']}; stacks in {verdict['dir']}; "
                         + ("replacing that replica (the others go on)\n" if verdict.get("replica")
                            else "restarting from the latest checkpoint\n"))
        sys.stderr.flush()
        # The live ranks save their stacks when their next beat reads the verdict (within
        # a second); a frozen rank killed before that breaks their collectives and they
        # may exit first. Wait for their files (run_dir visible here), at most STACKS_WAIT_S.
        frozen = {s["rank"] for s in verdict["stuck"] if s.get("last_beat_s", 0) >= STALE_BEAT_S}
        wait_for_stacks(Path(verdict["dir"]), [r for r in self._seen if r not in frozen], STACKS_WAIT_S)
        kill_frozen(verdict)
        if self.on_verdict is not None:
            self.on_verdict(verdict)


STACKS_WAIT_S = 3.0  # the longest the kill of a frozen rank waits for the live ranks' stacks


def wait_for_stacks(d: Path, ranks: list[int], timeout: float) -> bool:
    """Until every rank in `ranks` has written d/rank<r>.txt (or `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if all((d / f"rank{r}.txt").exists() for r in ranks):
                return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _sigkill_ray_worker(pid: int) -> bool:
    """On the frozen rank's node: SIGKILL it, if that pid is still a Ray worker."""
    import os
    import signal

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"ray" not in f.read():  # the pid was reused: not ours
                return False
        os.kill(pid, signal.SIGKILL)
        return True
    except (OSError, ValueError):
        return False


def kill_frozen(verdict: dict) -> int:
    """A frozen process (no heartbeat) cannot exit by itself, and with one rank per node
    no peer on its node is left to kill it: a zero-CPU task pinned to its node does, so
    the group is torn down at once instead of after Ray gives up on an actor that does
    not answer (11.6 s from the verdict to the group gone in a soak; a kill is seen in
    ~2 s). Best effort: any error leaves it to Ray. -> the kills sent."""
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            return 0
        task = ray.remote(num_cpus=0, max_retries=0)(_sigkill_ray_worker)
        sent = 0
        for s in verdict.get("stuck", []):
            if s.get("last_beat_s", 0) >= STALE_BEAT_S and s.get("node") and s.get("pid"):
                task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(s["node"], soft=False)).remote(
                    int(s["pid"]))
                sent += 1
        return sent
    except Exception:
        return 0


class ReplicaWatchdog(HangWatchdog):
    """run.fault_tolerance=replica: every replica (one worker with its own gen) is judged
    on its own. One whose heartbeat stopped for FROZEN_S, or whose progress stood still
    for its phase's timeout, while another replica goes on stepping, is named; only it
    goes (killed when frozen; it saves its stacks and exits when it still beats), Ray
    starts a replacement that heals from a live peer, and the others never stop."""

    def __post_init__(self):
        super().__post_init__()
        self._replicas: dict[str, _Seen] = {}  # gen -> what was seen of it
        self._by_rank: dict[int, _Seen] = {}

    def _track(self, recs: list[dict], now: float) -> dict[int, _Seen]:
        newest = newest_per_rank(recs)
        for r in newest.values():
            old = self._replicas.get(r["gen"])
            if old is None:
                self._replicas[r["gen"]] = _Seen(r, now, now)
            else:
                old.saw(r, now)
        self._by_rank = {rank: self._replicas[r["gen"]] for rank, r in newest.items()}
        return self._by_rank

    def _latest(self) -> list[_Seen]:
        # each rank's newest replica, as one group for the slow-link check (it compares
        # the ranks of one gen; every replica has its own)
        return [_Seen({**s.rec, "gen": "replicas"}, s.beat_t, s.progress_t) for s in self._by_rank.values()]

    def check(self, recs: list[dict], now: float) -> dict | None:
        replicas = self._track(recs, now)
        for s in replicas.values():
            if s.rec["gen"] in self._judged:
                continue
            silent, idle, limit = now - s.beat_t, now - s.progress_t, self.timeout([s], now)
            # Frozen once its beats are stale (then killed: it cannot exit by itself);
            # stuck when it still beats (it saves its stacks and exits); in between,
            # wait: a verdict it cannot act on and nobody kills would be lost.
            frozen, stuck = silent >= STALE_BEAT_S, silent < 2 * BEAT_S + self.poll_s and idle >= limit
            # judged only while another replica moves on (the whole group standing
            # still is not one replica's fault: its collective timeout or Ray has it)
            others = [o for o in replicas.values() if o is not s and now - o.beat_t < STALE_BEAT_S
                      and now - o.progress_t < limit]
            if others and (frozen or stuck):
                return self._replica_verdict(s, now, idle, limit, frozen)
        return None

    def _replica_verdict(self, s: _Seen, now: float, idle: float, limit: float, frozen: bool) -> dict:
        self._judged.add(s.rec["gen"])
        n = len(self.verdicts) + 1
        verdict = {
            "gen": s.rec["gen"], "idle_s": round(idle, 1), "timeout_s": round(STALE_BEAT_S if frozen else limit, 1),
            "reason": "no heartbeat (process frozen)" if frozen else "no progress while the other replicas step",
            "step": s.rec["step"], "dir": str(self.run_dir / "hangs" / f"{n:03d}"), "replica": True,
            "stuck": [{"rank": s.rec["rank"], "pid": s.rec["pid"], "node": s.rec["node"], "step": s.rec["step"],
                       "phase": s.rec["phase"], "last_beat_s": round(now - s.beat_t, 1)}],
        }
        self.verdicts.append(verdict)
        return verdict
