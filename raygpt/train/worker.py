"""The Ray Train per-worker function: a short adapter around raygpt.train.trainer.Trainer.

It gives the Trainer what comes from Ray: rank, world size and device; reports (metrics,
checkpoints) through ray.train.report; the checkpoint Ray registered last; stop requests
(SIGTERM on this process, Ctrl-C on the driver through Ray's KV store) and preemption
notices; and the fault injection `raygpt chaos` and the tests use (raygpt.train.faults).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

from raygpt.config import validate
from raygpt.train import trainer as T
from raygpt.train.faults import Injector

# The driver puts a stop request here (key: the fit's run id); workers poll it.
STOP_NAMESPACE = "raygpt"
# A replica on a draining node leaves this long before the deadline (clean: its heartbeat
# withdrawn, not killed mid-step by the reclaim).
REPLICA_LEAVE_MARGIN_S = 5.0


def stop_key(run_id: str) -> str:
    return f"stop:{run_id}"


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report with all its metrics at INFO (a logger named after
    its file); our own step lines carry the same figures."""
    import logging

    try:
        from raygpt import raycompat

        logging.getLogger(raycompat.train_report_logger()).setLevel(logging.WARNING)
        # A planned move off a draining node leaves the function by an exception: not
        # an error to show with a traceback (our own line says what happened).
        from raygpt.train.preemption import PREEMPTED_MARK

        logging.getLogger(raycompat.train_worker_error_logger()).addFilter(
            lambda rec: PREEMPTED_MARK not in rec.getMessage())
    except Exception:
        pass


def _register_worker(run_dir: Path, rank: int, world: int, node_id: str) -> None:
    """<run_dir>/.workers/rank<r>.json: where each rank runs (used by raygpt chaos)."""
    import json

    d = run_dir / ".workers"
    info = {"rank": rank, "world_size": world, "pid": os.getpid(),
            "node_id": node_id, "time": time.time()}
    tmp = d / f".rank{rank}.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob("rank*.json"):
            if rank == 0 and int(stale.stem[4:]) >= world:
                stale.unlink(missing_ok=True)
        tmp.write_text(json.dumps(info))
        os.replace(tmp, d / f"rank{rank}.json")
    except OSError as e:  # only chaos reads it: storage that refuses writes must not stop training
        from raygpt.errors import describe_os_error

        sys.stdout.write(f"[raygpt] warning: rank {rank}: worker registration not written ({describe_os_error(e)})\n")
        sys.stdout.flush()


class _StopWatcher:
    """Polls the driver's requests in Ray's KV store twice a second: a stop (Ctrl-C) and
    a drain notice for this worker group (raygpt.train.preemption)."""

    def __init__(self, run_id: str | None, gen: str | None = None, rank: int = 0):
        self._done = threading.Event()
        self.gen, self.run_id, self.rank = gen, run_id, rank
        self._announced = False
        if run_id:
            threading.Thread(target=self._run, args=(run_id,), daemon=True).start()

    def _run(self, run_id: str) -> None:
        from raygpt import raycompat
        from raygpt.train.preemption import read_notice

        while not self._done.wait(0.5):
            try:
                if raycompat.kv_get(stop_key(run_id), namespace=STOP_NAMESPACE):
                    T.STOP.set(T.STOP_INTERRUPT)
                notice = read_notice(run_id)
                if notice and notice.get("gen") == self.gen:
                    T.STOP.set(T.STOP_PREEMPT, notice)
                if notice and self.gen in notice.get("gens", ()) and time.time() >= self._leave_at(notice):
                    self._leave(notice)
            except Exception:
                pass

    def _leave_at(self, notice: dict) -> float:
        """When a replica on a draining node goes: REPLICA_LEAVE_MARGIN_S before the
        deadline (it trains until then: its replacement cannot start on a draining node
        anyway, so leaving at the notice only left the run a replica short for the whole
        notice), at once without a deadline."""
        at = notice["deadline"] - REPLICA_LEAVE_MARGIN_S if notice.get("deadline") else 0.0
        if not self._announced:
            self._announced = True
            wait = max(0.0, at - time.time())
            sys.stdout.write(f"[raygpt] node {notice['nodes'][0][:8]} draining: this replica leaves"
                             f"{f' in {wait:.0f} s' if wait >= 1 else ''}; a replacement heals from the others\n")
            sys.stdout.flush()
        return at

    def _leave(self, notice: dict) -> None:
        """run.fault_tolerance=replica, this replica's node draining: go (the others hold
        the state; nothing to save); Ray replaces it on a node that stays. Its heartbeat
        goes first, so the watchdog does not take it for a frozen replica."""
        from raygpt.train.heartbeat import HANG_EXIT_CODE, beat_key, delete_keys

        delete_keys(beat_key(self.run_id, self.rank))
        os._exit(HANG_EXIT_CODE)

    def close(self) -> None:
        self._done.set()


def _report_checkpoint(path: Path, step: int, metrics: dict, mode: str) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode

    if mode == "in_place":  # already in the run's storage (a local directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint(str(path)),
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    else:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_dir_name=f"checkpoint_{step:07d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


def _registered_step(ray_ckpt, rank: int) -> int | None:
    """The step of Ray's latest registered checkpoint; -1 when it is not a complete one
    that reads (a read error on it: choose_restore then takes the newest complete one in
    the run directory; nothing is deleted)."""
    if ray_ckpt is None:
        return None
    from raygpt.train.checkpoint.discovery import COMPLETE, UNREADABLE, inspect_checkpoint

    try:
        with ray_ckpt.as_directory() as d:
            status, step, why = inspect_checkpoint(d)
    except Exception as e:
        status, step, why = UNREADABLE, None, f"{type(e).__name__}: {e}"
    if status != COMPLETE:
        T.log(rank, f"the latest registered checkpoint {ray_ckpt.path} is {status} ({why}): kept, "
                    "not restored from; restoring the newest complete one")
        return -1
    return step


def _group_token(world: int) -> str:
    """One id for this worker group, the same on every rank (rank 0's, broadcast): the
    hang watchdog tells a restarted group's heartbeats from the old one's."""
    import uuid

    token = [uuid.uuid4().hex[:12]]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(token, src=0)
    return token[0]


FAILURE_MARK = "raygpt-failure"


def failure_signature(step: int, e: BaseException) -> str:
    """What a restart compares: the same exception at the same step is a bug or a bad
    batch, not bad luck (raygpt.train.rayhooks stops the run instead of looping)."""
    import hashlib

    first = (str(e).splitlines() or [""])[0]
    sig = hashlib.sha1(f"{type(e).__name__}:{first}".encode()).hexdigest()[:12]
    return f"[{FAILURE_MARK} step={step} sig={sig}]"


class StepFailed(RuntimeError):
    """A training error, marked with where it happened and what it was."""


class _WorkerRun:
    """train_func in named steps: device, heartbeat, trainer, restore, train, finish."""

    def __init__(self, loop_config: dict):
        import ray.train

        self.t0 = time.time()  # this group's start, for the goodput ledger
        self.lc = loop_config
        self.cfg = validate(loop_config["config"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        run_dir = loop_config.get("run_dir")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.inject = loop_config.get("inject") or {}
        self.node_id = ray.get_runtime_context().get_node_id()
        self.progress = T.Progress()
        self.gen: str | None = None  # this worker group's id (set with the heartbeat)
        # run.fault_tolerance=replica: every worker is a replica group of one (Ray's
        # TorchftConfig), replaced alone when it fails
        self.replica = self.cfg.run.fault_tolerance == "replica"

    def device(self) -> torch.device:
        import ray.train.torch

        torch.set_num_threads(T.threads(self.cfg))
        device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return device

    def heartbeat(self):
        from raygpt.train.heartbeat import Publisher

        if not self.lc.get("run_id"):
            return None
        # a replica is judged alone (raygpt.train.watchdog.ReplicaWatchdog): its own gen
        self.gen = _group_token(1 if self.replica else self.world)
        return Publisher(self.lc["run_id"], self.gen, self.rank, 1 if self.replica else self.world,
                         self.node_id, self.run_dir, self.progress)

    def trainer(self, device) -> "T.Trainer":
        import ray.train

        from raygpt.data.loader import worker_data_dir

        faults = Injector(self.inject, self.rank, self.run_dir)
        faults.in_data_prep()
        # Data: a shared path from the driver, or the bundled corpus prepared on this node
        # (a URI or a path this node cannot see: fetched into the node-local cache).
        t_prep = time.perf_counter()
        data_dir = worker_data_dir(self.cfg.data, self.lc.get("data_dir"))
        self.prepare_s = time.perf_counter() - t_prep
        report_metrics, report_checkpoint = ray.train.report, _report_checkpoint
        if self.replica:  # no Ray reports: they are barriers across all workers (raygpt.train.replica)
            from raygpt.train.replica import keep_newest

            report_metrics, report_checkpoint = T._noop, keep_newest(self.run_dir, self.cfg.checkpoint.keep)
        hooks = T.Hooks(
            report_metrics=report_metrics, report_checkpoint=report_checkpoint,
            after_step=faults.after_step, before_save=faults.before_save, before_step=faults.before_step,
            progress=self.progress, node_id=lambda: self.node_id, on_straggler=self._drain_straggler,
            drain_notice=self._drain_notice,
        )
        async_ok = device.type == "cuda" or self.inject.get("async_save_on_cpu")
        return T.Trainer(self.cfg, data_dir, rank=self.rank, world=1 if self.replica else self.world, device=device,
                         run_dir=self.run_dir, ckpt_root=self.run_dir if self.lc.get("ckpt_in_place") else None,
                         hooks=hooks, use_async=bool(self.cfg.checkpoint.async_save and async_ok),
                         replica_of=(self.rank, self.world) if self.replica else None)

    def _drain_notice(self) -> dict | None:
        from raygpt.train.preemption import read_notice

        notice = read_notice(self.lc["run_id"]) if self.lc.get("run_id") else None
        return notice if notice and notice.get("gen") == self.gen else None

    def _drain_straggler(self, ev: dict) -> None:
        from raygpt.train.preemption import request_drain

        if self.lc.get("run_id"):
            request_drain(self.lc["run_id"], ev["node"],
                          f"straggler: rank {ev['rank']} at {ev['ratio']:.2f}x the others for {ev['steps']} steps")

    @staticmethod
    def restore(trainer: "T.Trainer") -> None:
        import ray.train

        if trainer.member is not None and trainer.member.join():
            return  # a replacement: healed from a live peer, no checkpoint read
        ray_ckpt = ray.train.get_checkpoint()
        choice = trainer.ckpt.choose_restore(_registered_step(ray_ckpt, trainer.rank))
        if choice == "registered":
            with ray_ckpt.as_directory() as d:
                trainer.restore(d)
        elif choice is not None:
            trainer.restore(choice)
        if trainer.member is not None:
            trainer.member.set_step(trainer.step)

    def train(self, trainer: "T.Trainer") -> dict:
        if self.run_dir is not None:
            _register_worker(self.run_dir, self.rank, self.world, self.node_id)
        watcher = _StopWatcher(self.lc.get("run_id"), self.gen, self.rank)
        try:
            return trainer.train()
        except T.Stopped:
            raise
        except Exception as e:
            raise StepFailed(f"{failure_signature(trainer.step, e)} rank {self.rank} after step {trainer.step}: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            watcher.close()

    def finish(self, summary: dict) -> None:
        if self.rank == 0 and self.run_dir is not None and self.lc.get("run_uri"):
            from raygpt.train.metrics import upload_dir

            upload_dir(self.run_dir, self.lc["run_uri"])
        if summary.get("stopped") == "preemption":
            from raygpt.train.preemption import PREEMPTED_MARK

            n = T.STOP.notice or {}
            raise T.Preempted(f"{PREEMPTED_MARK} node(s) {', '.join(x[:8] for x in n.get('nodes', []))} "
                              f"draining: checkpointed step {summary['steps']}; the group restarts off them")
        if summary.get("stopped") == "sigterm":
            # The checkpoint is reported; the process was asked to go. Ray restarts the
            # group from this checkpoint (FailureConfig.max_failures permitting).
            raise T.Stopped(f"SIGTERM: checkpointed step {summary['steps']}; this worker exits")


def train_func(loop_config: dict) -> None:
    """Entry point given to TorchTrainer. loop_config: {"config": Config dict, "run_dir":
    local path for metrics/summary (or None), "data_dir", "ckpt_in_place": checkpoints
    are written straight into run_dir (local storage), "run_id", "run_uri", "inject"}."""
    _quiet_ray_train_reports()
    run = _WorkerRun(loop_config)
    device = run.device()
    beat = run.heartbeat()  # before data preparation: a hang there is judged too
    try:
        trainer = run.trainer(device)
        t_restore = time.perf_counter()
        run.restore(trainer)
        # In the `start` event: where this group's start went (raygpt.train.goodput).
        trainer.startup = {"t0": round(run.t0, 3), "prepare_s": round(run.prepare_s, 4),
                           "restore_s": round(time.perf_counter() - t_restore, 4)}
        summary = run.train(trainer)
    finally:
        if beat is not None:
            beat.close()
    run.finish(summary)
