"""Where each rank is, published for the hang watchdog (raygpt.train.watchdog).

The training thread marks its phase and step (two attribute writes: nothing on the hot
path waits). A daemon thread of the same process publishes that once a second to Ray's
KV store and reads the driver's verdict back. A rank whose process is frozen (SIGSTOP, a
stuck driver call holding the process) stops publishing; a rank whose training thread is
blocked (I/O, a dead peer) keeps publishing, with its step and phase standing still.

On a verdict every rank's publisher thread saves the stacks of all its threads into the
run directory, SIGKILLs the stuck ranks that run on its own node (a frozen process
cannot exit by itself) and exits its process, so Ray Train restarts the group from the
latest checkpoint without the stuck process.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from raygpt import raycompat

# The order of the phases inside one step: a rank behind another (same step, earlier
# phase) is the one the others wait for. "data" and "compute" carry the step being
# computed, "agree" and "hook" the step just completed.
STEP_PHASES = {"data": 0, "compute": 1, "agree": 2, "hook": 3}
# Phases that may legitimately last long: judged with the generous init timeout
# ("quorum": a replica waiting for the torchft quorum, e.g. for a replacement to join).
LONG_PHASES = {"init", "eval", "checkpoint", "hold", "quorum"}
NAMESPACE = "raygpt"
BEAT_S = 1.0
STALE_BEAT_S = 5.0  # no heartbeat for this long: the process is frozen (the watchdog's test too)
HANG_EXIT_CODE = 75  # EX_TEMPFAIL: the process exits so the group restarts


def beat_key(run_id: str, rank: int) -> str:
    return f"hb:{run_id}:{rank}"


def verdict_key(run_id: str, gen: str) -> str:
    return f"hang:{run_id}:{gen}"


def read_beats(run_id: str) -> list[dict]:
    """Every rank's latest heartbeat record (old groups' too, until overwritten)."""
    out = []
    for key in raycompat.kv_keys(f"hb:{run_id}:", namespace=NAMESPACE):
        raw = raycompat.kv_get(key, namespace=NAMESPACE)
        if raw:
            out.append(json.loads(raw))
    return out


def newest_per_rank(beats: list[dict]) -> dict[int, dict]:
    """Each rank's record from its newest process (replica mode: every rank is a group of
    its own, so the newest gen is per rank, not one for all)."""
    newest: dict[int, dict] = {}
    for r in beats:
        if r["rank"] not in newest or r["started"] > newest[r["rank"]]["started"]:
            newest[r["rank"]] = r
    return newest


def delete_keys(*keys: str, prefix: bool = False) -> None:
    """Remove a run's keys from Ray's KV store (best effort: the run is ending)."""
    try:
        for key in keys:
            raycompat.kv_del(key, prefix=prefix, namespace=NAMESPACE)
    except Exception:
        pass


def stop_thread(stop: threading.Event, th: threading.Thread, *keys: str, prefix: bool = False) -> None:
    """End a driver thread (the hang watchdog, the drain watch): signal it, wait up to
    5 s, then remove its run's keys (delete_keys)."""
    stop.set()
    if th.is_alive():
        th.join(timeout=5)
    delete_keys(*keys, prefix=prefix)


def position(rec: dict) -> tuple[int, int]:
    """(step, order in the step) of a heartbeat: comparable across ranks."""
    return int(rec.get("step", 0)), STEP_PHASES.get(rec.get("phase", ""), -1)


class Progress:
    """Written by the training thread, read by the publisher (plain attributes: a torn
    read costs at most one beat's accuracy)."""

    def __init__(self):
        self.phase, self.step, self.ticks = "init", 0, 0
        self.steps_done = 0          # steps completed by this process (0: still in phase 1)
        self.step_s_max = 0.0        # the slowest step after the first one (sizes the timeout)
        self.last_compute_s = 0.0    # the previous step's forward time (chaos's `slow` scales it)

    def mark(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step
        self.ticks += 1

    def step_done(self, seconds: float) -> None:
        if self.steps_done:
            self.step_s_max = max(self.step_s_max, seconds)
        self.steps_done += 1


class Publisher:
    """The per-rank daemon thread: beat, read the verdict, act on it."""

    def __init__(self, run_id: str, gen: str, rank: int, world: int, node_id: str, run_dir: Path | None,
                 progress: Progress):
        self.run_id, self.gen, self.rank, self.world = run_id, gen, rank, world
        self.node_id, self.run_dir, self.progress = node_id, run_dir, progress
        self.started = time.time()
        self.seq = 0
        self.rtt_ms: float | None = None  # the last beat's KV put round trip (raygpt.train.links)
        self._done = threading.Event()
        self._th = threading.Thread(target=self._run, name="raygpt-heartbeat", daemon=True)
        self._th.start()

    def record(self) -> dict:
        p = self.progress
        return {"gen": self.gen, "rank": self.rank, "world": self.world, "pid": os.getpid(),
                "node": self.node_id, "seq": self.seq, "phase": p.phase, "step": p.step, "ticks": p.ticks,
                "steps_done": p.steps_done, "step_s_max": round(p.step_s_max, 4), "started": self.started,
                "rtt_ms": self.rtt_ms}

    def _run(self) -> None:
        key, vkey = beat_key(self.run_id, self.rank), verdict_key(self.run_id, self.gen)
        first = True
        while first or not self._done.wait(BEAT_S):  # the first beat at once
            first = False
            try:
                self.seq += 1
                t0 = time.perf_counter()
                raycompat.kv_put(key, json.dumps(self.record()), namespace=NAMESPACE)
                # published with the next beat: a slow link to the head shows here
                self.rtt_ms = round(1000 * (time.perf_counter() - t0), 2)
                raw = raycompat.kv_get(vkey, namespace=NAMESPACE)
            except Exception:  # the GCS briefly away: beat again next second
                continue
            if raw:
                self._act(json.loads(raw))
                return

    def _act(self, verdict: dict) -> None:
        """Save this process's stacks, kill stuck ranks on this node, exit. A stuck rank
        that can still act leaves last (a few seconds at most): its exit breaks the
        others' collectives, and they should have saved their stacks by then."""
        self.save_stacks(verdict)
        if any(s.get("rank") == self.rank for s in verdict.get("stuck", [])):
            d = Path(verdict.get("dir") or ".")
            deadline = time.monotonic() + 5 * BEAT_S
            while time.monotonic() < deadline and len(list(d.glob("rank*.txt"))) < self.world:
                time.sleep(0.1)
        for s in verdict.get("stuck", []):
            # Only a frozen rank is killed: a stuck one that still beats saves its own
            # stacks and exits (killed at once, its stacks were lost when it read the
            # verdict a beat later than this rank).
            if s.get("last_beat_s", 0) < STALE_BEAT_S:
                continue
            if s.get("node") == self.node_id and s.get("pid") not in (None, os.getpid()):
                try:
                    os.kill(int(s["pid"]), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        sys.stdout.write(f"[raygpt] rank {self.rank}: hang declared ({verdict.get('reason')}); stacks saved; "
                         "exiting so the group restarts from the latest checkpoint\n")
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)

    def save_stacks(self, verdict: dict) -> Path | None:
        d = Path(verdict.get("dir") or (self.run_dir / "hangs" if self.run_dir else ""))
        if not str(d):
            return None
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [f"rank {self.rank} pid {os.getpid()} node {self.node_id} phase {self.progress.phase} "
                 f"step {self.progress.step}\n"]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            lines.append(f"\n--- thread {names.get(ident, ident)}\n")
            lines.extend(traceback.format_stack(frame))
        try:
            d.mkdir(parents=True, exist_ok=True)
            out = d / f"rank{self.rank}.txt"
            tmp = d / f".rank{self.rank}.tmp"
            tmp.write_text("".join(lines))
            os.replace(tmp, out)
            self._save_nccl_trace(d)
            return out
        except OSError:
            return None

    def _save_nccl_trace(self, d: Path) -> None:
        """On NCCL, the flight recorder's last collectives (which one each rank is in),
        when it is on (TORCH_FR_BUFFER_SIZE, set for GPU runs by raygpt.train.rayhooks)."""
        try:
            import torch

            if not (torch.cuda.is_available() and torch.cuda.is_initialized()
                    and int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0"))):
                return
            trace = torch._C._distributed_c10d._dump_nccl_trace()
        except Exception:  # no NCCL group, or a torch without the recorder
            return
        tmp = d / f".rank{self.rank}.nccl.tmp"
        tmp.write_bytes(trace)
        os.replace(tmp, d / f"rank{self.rank}.nccl_trace.pkl")

    def close(self) -> None:
        """Stop beating and withdraw this rank's record: a replica that finished (or left)
        must not look frozen to the watchdog (raygpt.train.watchdog.ReplicaWatchdog)."""
        self._done.set()
        self._th.join(timeout=2 * BEAT_S)
        delete_keys(beat_key(self.run_id, self.rank))
