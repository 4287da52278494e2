"""The ray-project/ray#54305 workaround: release a stopped Tune trial's Train resources.

When Tune stops a trial, it stops the trial's actor. The Train controller and workers
that the trial started die with it, but the workers' placement group belongs to the
job, not to the controller, so it keeps its CPUs/GPUs until the driver exits (Ray
2.60 adds a detached PlacementGroupCleaner that polls the state API; it does nothing
when the dashboard is off and acts a poll interval later otherwise). The next trial's
worker group then waits for resources that never come.

raygpt releases them itself, synchronously, before Tune starts the next trial:
- a Train callback (`_RegisterWithReaper`, run by the controller) registers the
  controller actor and each worker group's placement group under the trial id with a
  small registry actor (`_Reaper`, 0 CPU, owned by the sweep driver);
- a Tune callback (`_ReapStoppedTrials`, in the driver) runs on every trial end
  (`on_trial_complete` is called before Tune stops the trial actor and before it
  schedules another trial, `on_trial_error` too): it kills that trial's controller and
  removes its placement groups, then waits until Ray reports them removed.
A trial that finishes normally has already shut its worker group down; reaping it is a
no-op. Tune must not stop a trial on its final report (the worker still writes its
summary after it), so Train's `done` flag reaches Tune as `finished`, and ASHA's last
rung stays below train.max_steps.
"""
from __future__ import annotations

import logging
import time

logger = logging.getLogger("raygpt.tune")

REAPER_NAMESPACE = "raygpt"


class _Reaper:
    """Registry (a 0-CPU actor owned by the driver): trial id -> its Train controller
    actors and worker-group placement groups."""

    def __init__(self):
        self._live: dict[str, dict] = {}
        self._reaped: set[str] = set()

    def register_controller(self, trial_id: str, handle) -> None:
        self._live.setdefault(trial_id, {"controllers": [], "pgs": []})["controllers"].append(handle)

    def register_pg(self, trial_id: str, pg) -> None:
        self._live.setdefault(trial_id, {"controllers": [], "pgs": []})["pgs"].append(pg)

    def take(self, trial_id: str):
        self._reaped.add(trial_id)
        return self._live.pop(trial_id, None)

    def take_all(self):
        out, self._live = self._live, {}
        self._reaped.update(out)
        return out

    def was_reaped(self, trial_id: str) -> bool:
        return trial_id in self._reaped

    def live(self) -> list[str]:
        return sorted(self._live)


_REAPER_HANDLE = None  # keeps the driver's registry alive for the process


def reaper_name() -> str:
    import ray

    return f"raygpt-tune-reaper-{ray.get_runtime_context().get_job_id()}"


def get_reaper(create: bool = False):
    import ray

    global _REAPER_HANDLE
    name = reaper_name()
    if create:
        if _REAPER_HANDLE is None or getattr(_REAPER_HANDLE, "_raygpt_name", None) != name:
            h = ray.remote(num_cpus=0)(_Reaper).options(
                name=name, namespace=REAPER_NAMESPACE, get_if_exists=True).remote()
            h._raygpt_name = name
            _REAPER_HANDLE = h
        return _REAPER_HANDLE
    return ray.get_actor(name, namespace=REAPER_NAMESPACE)


def release(entry: dict | None, timeout_s: float = 30.0) -> int:
    """Abort (or kill) the controllers and remove the placement groups of one trial; wait
    until Ray reports the groups removed. Returns how many groups were holding resources."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    if not entry:
        return 0

    def state(pg):
        try:
            return placement_group_table(pg).get("state", "REMOVED")
        except Exception:
            return None

    pgs = entry.get("pgs", [])
    held = [pg for pg in pgs if state(pg) not in (None, "REMOVED")]
    for h in entry.get("controllers", []):
        # Abort first (what Ctrl-C on a `trainer.fit()` driver does): the controller stops
        # its workers and its PlacementGroupCleaner, then exits. Kill whatever is left.
        try:
            ray.get(h.abort.remote(), timeout=timeout_s / 2)
        except Exception:  # exited (the normal end of abort), already dead, or stuck
            pass
        try:
            ray.kill(h, no_restart=True)
        except Exception:
            pass
    deadline = time.monotonic() + timeout_s
    for pg in held:
        if state(pg) not in (None, "REMOVED"):
            try:
                remove_placement_group(pg)
            except Exception as e:
                logger.warning("raygpt tune: could not remove placement group %s: %s", pg.id, e)
                continue
        while time.monotonic() < deadline and state(pg) not in (None, "REMOVED"):
            time.sleep(0.05)
    return len(held)


def register_with_reaper(trial_id: str, name: str):
    """The Train-side callback (runs in the controller) that registers a trial's
    controller and worker-group placement groups with the sweep's registry."""
    from raygpt.raycompat import ControllerCallback, WorkerGroupCallback

    class _RegisterWithReaper(ControllerCallback, WorkerGroupCallback):
        """Runs in the Train controller: tell the sweep's registry what to release."""

        def __init__(self, trial_id: str, reaper: str):
            self.trial_id, self.reaper = trial_id, reaper

        def _call(self, method: str, arg) -> None:
            import ray

            try:
                h = ray.get_actor(self.reaper, namespace=REAPER_NAMESPACE)
                ray.get(getattr(h, method).remote(self.trial_id, arg), timeout=30)
            except Exception as e:
                logger.warning("raygpt tune: could not register %s for trial %s: %s",
                               method, self.trial_id, e)

        def after_controller_start(self, train_run_context):
            import ray

            self._call("register_controller", ray.get_runtime_context().current_actor)

        def after_worker_group_start(self, worker_group):
            state = worker_group.get_worker_group_state()
            self._call("register_pg", state.placement_group_handle.placement_group)

    return _RegisterWithReaper(trial_id, name)


def reap_callback():
    from ray import tune

    class _ReapStoppedTrials(tune.Callback):
        """Driver side: release a trial's Train resources the moment it ends."""

        def _reap(self, trial) -> None:
            import ray

            try:
                entry = ray.get(get_reaper().take.remote(trial.trial_id), timeout=30)
            except Exception as e:
                logger.warning("raygpt tune: reaper unavailable for %s: %s", trial.trial_id, e)
                return
            n = release(entry)
            if n:
                print(f"raygpt tune: released the Train workers of stopped trial {trial.trial_id} "
                      f"({n} placement group{'s' if n > 1 else ''})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._reap(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._reap(trial)

        def on_experiment_end(self, trials, **info):
            import ray

            try:
                rest = ray.get(get_reaper().take_all.remote(), timeout=30)
            except Exception:
                return
            for entry in rest.values():
                release(entry)

    return _ReapStoppedTrials()
