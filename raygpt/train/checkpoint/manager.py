"""The CheckpointManager: when a rank saves, where, the async save in flight, reporting
it, dropping a save the storage refused, and which checkpoint a (re)start resumes from."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from raygpt.train.checkpoint.discovery import (INCOMPLETE, UNREADABLE, checkpoint_dirs, complete_checkpoints,
                                               inspect_checkpoint)
from raygpt.train.checkpoint.io import save_checkpoint, storage_error

logger = logging.getLogger(__name__)


class CheckpointManager:
    """When to save, where, the async save in flight, reporting, retention, and which
    checkpoint a (re)start resumes from. Ray-free: `report(path, step, metrics, mode)`
    is given by the runtime ("mode": "in_place" when `path` is already in the run's
    storage, "upload" when it is a temporary directory to copy there and delete).

    Saves go straight into <ckpt_root>/checkpoint_<step> when the run's storage is a
    local directory, so a finished async save is visible to the restore scan at once;
    every step the ranks agree (one tiny all-reduce on the CPU group) whether all their
    async writes are done, and report it then, not at the next save.
    """

    def __init__(self, ckpt_cfg, *, rank: int, world: int, ckpt_root: str | os.PathLike | None,
                 report, use_async: bool, cpu_group=None, device=None, tokenizer_path=None,
                 on_event=None, before_write=None):
        self.cfg = ckpt_cfg
        self.rank, self.world = rank, world
        self.root = Path(ckpt_root) if ckpt_root is not None else None
        self.report = report
        self.use_async = use_async
        self.async_mode = getattr(ckpt_cfg, "async_mode", "thread")
        self.cpu_group = cpu_group
        self.tokenizer_path = tokenizer_path
        self.on_event = on_event or (lambda name, **kw: None)
        self.before_write = before_write or (lambda step: None)
        self.pending = None  # (future, path, mode, step, metrics, created)
        self.requested = False  # checkpoint.every=auto: the ranks agreed to save at the next step
        self.failed_saves = 0  # consecutive saves the storage refused (0 after a success)
        self._stager = None
        if use_async:
            # Host buffers (pinned on GPU) allocated at the first save, reused by every
            # later one; the same code on CPU (forced async) and GPU.
            from raygpt.train.staging import PinnedStager

            self._stager = PinnedStager(pin=device is not None and device.type == "cuda",
                                        shared=self.async_mode == "process")

    def due(self, step: int, max_steps: int) -> bool:
        if self.cfg.every == "auto":
            return self.requested or step == max_steps
        return bool(self.cfg.every and step % self.cfg.every == 0) or step == max_steps

    def _target(self, step: int) -> tuple[Path, str]:
        if self.root is not None:
            return self.root / f"checkpoint_{step:07d}", "in_place"
        import tempfile

        try:
            return Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-")), "upload"
        except OSError:  # no raise before DCP's collectives: the save's own mkdir fails again
            return Path(tempfile.gettempdir()) / f"raygpt-ckpt-{step}-{os.getpid()}", "upload"

    def save(self, step: int, parts, optimizers, trainer_state: dict, metrics: dict, rng_meta: dict,
             final: bool = False) -> float:
        """Every rank calls this. Returns the seconds training was blocked. A save the
        storage refuses (read-only, full, an I/O error) fails on every rank alike (see
        save_checkpoint) and is dropped: an event, nothing reported; the next save retries."""
        import time

        self.wait()
        self.requested = False
        path, mode = self._target(step)
        created = mode == "upload" or not _exists(path)
        t0 = time.perf_counter()
        self.before_write(step)
        try:
            fut = save_checkpoint(path, parts, optimizers, trainer_state, self.rank, self.tokenizer_path,
                                  use_async=self.use_async and not final, async_pg=self.cpu_group,
                                  async_stager=self._stager, async_mode=self.async_mode, rng_meta=rng_meta)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._failed(e, step, path, created)
            return time.perf_counter() - t0
        blocked = time.perf_counter() - t0
        metrics = dict(metrics, checkpoint_blocked_s=round(blocked, 4))
        self.on_event("checkpoint", step=step, blocked_s=round(blocked, 4), asynchronous=fut is not None)
        if fut is not None:
            self.pending = (fut, path, mode, step, metrics, created)
        else:
            self._report(path, step, metrics, mode)
        return blocked

    def _report(self, path: Path, step: int, metrics: dict, mode: str) -> None:
        self.failed_saves = 0
        self.report(path, step, metrics, mode)

    def _failed(self, exc: BaseException, step: int, path: Path, created: bool) -> None:
        """A storage error: event, count, remove what this save created. Else raise."""
        error = storage_error(exc)
        if error is None:
            raise exc
        self.failed_saves += 1
        self.on_event("checkpoint_failed", step=step, error=error)
        logger.warning("checkpoint at step %d failed, training goes on: %s", step, error)
        if created:
            shutil.rmtree(path, ignore_errors=True)

    def local_done(self) -> bool:
        return self.pending is None or self.pending[0].done()

    def complete_pending(self) -> None:
        """All ranks call this at the same step once every rank's async write is done
        (or to wait for it): report the checkpoint (or drop it, on every rank alike: DCP
        raises a rank's storage error in every rank's future)."""
        if self.pending is None:
            return
        fut, path, mode, step, metrics, created = self.pending
        self.pending = None
        try:
            fut.result()
        except BaseException as e:
            self._failed(e, step, path, created)
            return
        self.on_event("checkpoint_reported", step=step)
        self._report(path, step, metrics, mode)

    def wait(self) -> None:
        self.complete_pending()

    def close(self) -> None:
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    # ---------------------------------------------------------------- restore choice
    def choose_restore(self, registered_step: int | None) -> str | None:
        """Rank 0's choice, the same on every rank: "registered" (the runtime's latest
        registered checkpoint, at `registered_step`; -1 when its step is unreadable), a
        newer complete checkpoint in the run's directory (its path: a save that finished
        but whose report never arrived), or None."""
        choice = [None]
        if self.rank == 0:
            best, best_step = None, -1
            if registered_step is not None:
                best, best_step = "registered", registered_step
            if self.root is not None and self.root.is_dir():
                local = complete_checkpoints(self.root)
                if local and local[-1][0] > best_step:
                    best = str(local[-1][1])
            choice = [best]
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def prune_unfinished(self, restored_step: int) -> None:
        """Rank 0 removes the incomplete checkpoint dirs newer than the one resumed from
        (saves a crash cut short; this run writes those steps again). One that cannot be
        read is kept (a storage hiccup must not delete a good checkpoint): an event.
        Retention of reported checkpoints is the runtime's (Ray's CheckpointConfig.num_to_keep)."""
        if self.rank != 0 or self.root is None:
            return
        for step, d in sorted(checkpoint_dirs(self.root)):
            if step <= restored_step:
                continue
            status, _, why = inspect_checkpoint(d)
            if status == INCOMPLETE:
                shutil.rmtree(d, ignore_errors=True)
            elif status == UNREADABLE:
                logger.warning("checkpoint %s kept: it cannot be read (%s)", d, why)
                self.on_event("checkpoint_unreadable", step=step, error=why)


def _exists(path: Path) -> bool:
    """Whether `path` exists; True when that cannot be told (never remove it then)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True
