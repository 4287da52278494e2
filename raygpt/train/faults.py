"""Faults injected inside a training worker, for `raygpt chaos` and the tests: the keys of
the run's `inject` dict (launch's inject=, or RAYGPT_INJECT) become the Trainer's fault
hooks. Faults from outside the worker (kill, freeze, node loss, storage) are chaos.py's.

  crash_in_save_at: step      the process dies in a checkpoint save, before its shard is
                              written (rank inject["rank"], default 0)
  hang_at {step, rank}        the training thread blocks for good in a live process
  slow {step, rank, factor}   from that step on the rank's own work takes factor x as long
  fail_at {step, rank}        the step raises, on every try (a bug or a bad batch)
  await_world {step, world, timeout_s}  checkpoint and hold until Ray grows the group
  sigterm_in_data_prep {step: 0, rank}  a SIGTERM while the worker prepares its data
  pace_s: seconds             every rank's step takes this much longer (a bigger model's
                              pace, so a test's faults land while the run still steps)

A one-shot fault fires once per run: a marker file in the run directory remembers it
across restarts (chaos watches .hang_at-injected to time a hang)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def _say(line: str) -> None:
    sys.stdout.write(f"[raygpt] {line}\n")
    sys.stdout.flush()


class Injector:
    """The faults `inject` asks of this rank, as hooks the Trainer calls."""

    def __init__(self, inject: dict | None, rank: int, run_dir: str | os.PathLike | None):
        self.inject = inject or {}
        self.rank = rank
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def _once(self, name: str, spec: dict | None, step: int, default_rank: int = 1) -> bool:
        """A fault fires at (spec's step, spec's rank) once per run (marker .<name>-injected)."""
        if not spec or step != spec["step"] or self.rank != spec.get("rank", default_rank) or self.run_dir is None:
            return False
        marker = self.run_dir / f".{name}-injected"
        if marker.exists():
            return False
        marker.write_text(str(step))
        return True

    def in_data_prep(self) -> None:
        if self._once("sigterm_in_data_prep", self.inject.get("sigterm_in_data_prep"), 0):
            os.kill(os.getpid(), signal.SIGTERM)  # a drain notice while the data is prepared

    def before_save(self, step: int) -> None:
        """crash_in_save_at: the process dies before this rank's shard is written."""
        at = self.inject.get("crash_in_save_at")
        spec = {"step": at, "rank": self.inject.get("rank", 0)} if at is not None else None
        if self._once("crash-in-save", spec, step, default_rank=0):
            _say(f"injected crash during checkpoint save at step {step} (rank {self.rank})")
            os._exit(1)

    def before_step(self, trainer, step: int) -> None:
        """fail_at, hang_at and slow, inside the rank's step (its data phase)."""
        fail = self.inject.get("fail_at")
        if fail and step == fail["step"] and self.rank == fail.get("rank", 1):
            raise ValueError(f"injected bad batch at step {step}")  # every time: a bug, not bad luck
        if self._once("hang_at", self.inject.get("hang_at"), step):
            self._hang(step)
        slow = self.inject.get("slow")
        if slow and step >= slow["step"] and self.rank == slow.get("rank", 1):
            time.sleep(max(0.0, (float(slow["factor"]) - 1.0) * trainer.progress.last_compute_s))
        if self.inject.get("pace_s"):
            time.sleep(float(self.inject["pace_s"]))

    def _hang(self, step: int) -> None:
        """A read that never returns: the process lives, the training thread is stuck."""
        _say(f"injected hang at step {step} (rank {self.rank})")
        threading.Event().wait()

    def after_step(self, trainer, step: int) -> None:
        """await_world: at its step, while the group is smaller than its world, write a
        checkpoint and hold here so that Ray Train's elastic resize, not a race against the
        last step, decides when the group grows back. Ray ends this worker group when it
        resizes; after timeout_s the run goes on and logs that the grow never came."""
        spec = self.inject.get("await_world")
        if not spec or step != spec["step"] or trainer.world >= spec["world"]:
            return
        from raygpt.train.trainer import log

        trainer.checkpoint_now()
        timeout = float(spec.get("timeout_s", 300))
        w = trainer.writer
        w.event("await-grow", step=step, world_size=trainer.world, want=spec["world"], timeout_s=timeout)
        log(trainer.rank, f"holding at step {step} (world {trainer.world}) until Ray grows the group "
                          f"to {spec['world']}")
        trainer.progress.mark("hold")  # a wait the hang watchdog judges with the init timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
        w.event("await-grow-timeout", step=step, world_size=trainer.world, want=spec["world"], timeout_s=timeout)
        log(trainer.rank, f"ERROR: the group did not grow to {spec['world']} within {timeout:.0f} s at step {step}")
