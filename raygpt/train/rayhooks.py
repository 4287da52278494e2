"""What raygpt adds to Ray Train's TorchTrainer, in one place:

- a failure policy that stops a run failing the same way at the same step twice, and
  restarts a group that moved off draining nodes without charging `max_failures`;

- elastic runs size the worker group from the nodes alive now (raygpt.train.elastic);
- each worker actor installs raygpt's SIGTERM handler on its main thread (the training
  function runs on another thread, where `signal.signal` is refused), through the torch
  backend's training-start hook;
- Ctrl-C on the driver asks the workers (through Ray's KV store) to checkpoint at the
  next step and stop, instead of Ray Train's abort; a second Ctrl-C aborts. SIGTERM to
  the driver (`ray job stop`, a pod's termination) does the same: the run then ends
  through Ray Train's normal shutdown, which also withdraws its standing autoscaler
  request; a driver killed outright leaves that request to hold the nodes ~180 s.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass

import re

import ray
from ray.train.torch import TorchConfig, TorchTrainer

from raygpt import raycompat
from raygpt.raycompat import DefaultFailurePolicy, ElasticScalingPolicy, FailureDecision, TorchBackend
from raygpt.train.elastic import LiveElasticScalingPolicy

_SIGNATURE = re.compile(r"\[raygpt-failure step=\d+ sig=\w+\]")
REPEATED_KEY = "repeated:{run_id}"  # set (in the "raygpt" KV namespace) when a repeat stopped the run


def failure_signatures(err: BaseException) -> set[str]:
    """The raygpt failure marks (worker.failure_signature) in a Ray Train error."""
    texts = [str(err)] + [str(e) for e in (getattr(err, "worker_failures", None) or {}).values()]
    return {m for t in texts for m in _SIGNATURE.findall(t)}


def _controller_storage_error(err: BaseException) -> bool:
    from ray.train.v2.api.exceptions import ControllerError

    from raygpt.train.checkpoint.io import storage_error

    return isinstance(err, ControllerError) and storage_error(err.controller_failure) is not None


def moved_off_drain(err: BaseException) -> bool:
    """Every worker error is raygpt's exit after a drain notice's checkpoint."""
    from raygpt.train.preemption import PREEMPTED_MARK

    texts = [str(e) for e in (getattr(err, "worker_failures", None) or {}).values()]
    return bool(texts) and all(PREEMPTED_MARK in t for t in texts)


class RepeatAwareFailurePolicy(DefaultFailurePolicy):
    """Ray's budget (FailureConfig.max_failures), plus: the same training error at the
    same step a second time stops the run at once (a bug, a NaN, a bad batch would
    only fail again). Runs inside the Train controller actor."""

    def __init__(self, failure_config, run_id: str | None = None, run_dir: str | None = None,
                 replica: bool = False):
        super().__init__(failure_config)
        self._seen: set[str] = set()
        self._run_id = run_id
        self._run_dir = run_dir
        self._replica = replica
        self._moves = 0
        self._storage_faults = 0

    def make_decision(self, training_failed_error):
        decision = self._decide(training_failed_error)
        if self._run_dir:  # when the run knew the group was gone (the goodput ledger's detection)
            from raygpt.train.metrics import append_event

            try:
                append_event(self._run_dir, "group_failed", decision=decision.name.lower(),
                             planned=moved_off_drain(training_failed_error))
            except OSError:
                pass
        if self._replica and self._run_id and decision == FailureDecision.RETRY:
            self._forget_failed_replicas(training_failed_error)
        return decision

    def _forget_failed_replicas(self, err) -> None:
        """run.fault_tolerance=replica: a replica Ray saw die (killed, its node lost) has
        left its last heartbeat in the KV store, and until its replacement beats, the
        hang watchdog would take that silence for a frozen process (a `hang` verdict and
        a kill of a dead pid; seen when the replacement's start took over 5 s). Ray
        knows it is gone: its beat goes now, with the decision to replace it."""
        from raygpt.train.heartbeat import beat_key, delete_keys

        ranks = sorted((getattr(err, "worker_failures", None) or {}).keys())
        delete_keys(*(beat_key(self._run_id, r) for r in ranks))

    def _decide(self, training_failed_error):
        if _controller_storage_error(training_failed_error):
            # Ray Train's controller writes its checkpoint-manager snapshot to the run's
            # storage on every report: a read-only or full storage at that moment is a
            # storage fault, not a bug; restart from the latest checkpoint (budgeted).
            self._storage_faults += 1
            limit = self.failure_config.max_failures
            return FailureDecision.RETRY if limit == -1 or self._storage_faults <= limit else FailureDecision.RAISE
        if moved_off_drain(training_failed_error):
            # Every rank checkpointed and left on a drain notice: a planned move, not a
            # failure. Ray's preemption budget bounds it.
            self._moves += 1
            limit = self.failure_config.max_preemption_failures
            return FailureDecision.RAISE if limit != -1 and self._moves > limit else FailureDecision.RETRY
        sigs = failure_signatures(training_failed_error)
        repeated = sigs & self._seen
        self._seen |= sigs
        if repeated:
            if self._run_id:
                raycompat.kv_put(REPEATED_KEY.format(run_id=self._run_id), ",".join(sorted(repeated)),
                                 namespace="raygpt")
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


def _install_worker_handlers() -> bool:
    from raygpt.train.trainer import install_sigterm_handler

    return install_sigterm_handler()


def _flight_recorder_env() -> None:
    """NCCL's flight recorder on (before the process group exists): a hang verdict then
    saves each rank's last collectives beside its stacks (raygpt.train.heartbeat)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")


class _Backend(TorchBackend):
    def on_start(self, worker_group, backend_config):
        if worker_group.get_resources_per_worker().get("GPU", 0) > 0:
            worker_group.execute(_flight_recorder_env)
        super().on_start(worker_group, backend_config)

    def on_training_start(self, worker_group, backend_config):
        super().on_training_start(worker_group, backend_config)
        # execute() runs on each worker actor's main thread.
        worker_group.execute(_install_worker_handlers)


@dataclass
class RaygptTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _Backend


class _FtBackend(raycompat.TorchftBackend):
    """run.fault_tolerance=replica: Ray's torchft backend (a Lighthouse actor, one
    process group per replica group, a failed replica group replaced alone), with
    raygpt's SIGTERM handler on each worker."""

    def on_training_start(self, worker_group, backend_config):
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(_install_worker_handlers)

    def _maybe_create_lighthouse_actor(self, backend_config):
        if self.lighthouse_actor is None:  # Ray's, but with RUST_LOG: see _quiet_lighthouse
            self.lighthouse_actor = _quiet_lighthouse(backend_config.lighthouse_kwargs)
        return super()._maybe_create_lighthouse_actor(backend_config)


def _quiet_lighthouse(kwargs: dict):
    """Ray's Lighthouse actor as Ray creates it (on this node, an OS-picked port), with
    RUST_LOG=warn: torchft's Rust side logs every quorum at INFO (three long lines a step,
    which a cluster's raylets, started without RUST_LOG, sent to the driver's console)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return raycompat.LighthouseServerActor.options(
        runtime_env={"env_vars": {"RUST_LOG": os.environ.get("RUST_LOG", "warn")}},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                                           soft=False),
    ).remote(lighthouse_kwargs=kwargs if "bind" in kwargs else {"bind": "[::]:0", **kwargs})


class RaygptTorchftConfig(raycompat.TorchftConfig):
    @property
    def backend_cls(self):
        return _FtBackend


class RaygptTorchTrainer(TorchTrainer):
    """TorchTrainer with the live elastic policy and the graceful Ctrl-C."""

    interrupted = False
    # Set by the driver when it started Ray itself (it goes when the driver ends).
    embedded = False

    def _create_default_callbacks(self):
        """Ray Train's callbacks without two that only cost start-up here: the datasets
        callback starts a DatasetManager actor and sends every worker Ray Data's context
        (the worker then imports ray.data) though raygpt passes no Ray Dataset; the
        detached placement-group cleaner (a process polling the dashboard's state API)
        guards a cluster's placement groups against a dead controller, and an embedded
        Ray dies with the driver anyway."""
        drop = [raycompat.DatasetsCallback] if not self.datasets else []
        if self.embedded:
            drop.append(raycompat.PlacementGroupCleanerCallback)
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, tuple(drop))]

    def _initialize_and_run_controller(self, **kwargs):
        # RAYGPT_LIVE_ELASTIC=0: Ray's own policy (to compare; see docs/performance.md).
        if type(kwargs.get("scaling_policy")) is ElasticScalingPolicy and os.environ.get("RAYGPT_LIVE_ELASTIC") != "0":
            kwargs["scaling_policy"] = LiveElasticScalingPolicy(self.scaling_config,
                                                                (self.train_loop_config or {}).get("run_dir"))
        if type(kwargs.get("failure_policy")) is DefaultFailurePolicy:
            lc = self.train_loop_config or {}
            replica = (lc.get("config") or {}).get("run", {}).get("fault_tolerance") == "replica"
            kwargs["failure_policy"] = RepeatAwareFailurePolicy(self.run_config.failure_config, lc.get("run_id"),
                                                                lc.get("run_dir"), replica=replica)
        return super()._initialize_and_run_controller(**kwargs)

    def _register_sigint_handler(self, controller):
        from raygpt.train.worker import STOP_NAMESPACE, stop_key

        run_id = (self.train_loop_config or {}).get("run_id")
        if not run_id or threading.current_thread() is not threading.main_thread():
            return super()._register_sigint_handler(controller)
        count = 0

        def handler(signum, frame):
            nonlocal count
            count += 1
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            if count == 1:
                self.interrupted = True
                raycompat.kv_put(stop_key(run_id), b"interrupt", namespace=STOP_NAMESPACE)
                sys.stderr.write(f"\nraygpt: {what}: writing a checkpoint at the next step, then stopping "
                                 "(Ctrl-C again aborts without it)\n")
                sys.stderr.flush()
            elif count == 2:
                sys.stderr.write("raygpt: aborting the run\n")
                try:
                    ray.get(controller.abort.remote())
                except Exception:
                    sys.exit(130)
            else:
                sys.exit(130)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
