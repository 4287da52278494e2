"""The driver: checks what it can before any worker starts, then runs a TorchTrainer
(fixed or elastic ScalingConfig, FailureConfig, RunConfig) and shows progress.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from raygpt.config import Config, ConfigError
from raygpt.errors import UserError
from raygpt.files import is_uri


def redact_uri(uri: str) -> str:
    """s3://KEY:SECRET@bucket/... -> s3://bucket/... (for anything printed or saved)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def join_uri(base: str, *parts: str) -> str:
    """Append path parts to a URI, keeping its query (s3://b/p?endpoint_override=...)."""
    path, _, query = base.partition("?")
    joined = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def resolve_storage(cfg: Config) -> str:
    storage = cfg.run.storage or os.environ.get("RAYGPT_STORAGE") or "./runs"
    if is_uri(storage):
        if storage.startswith("file://"):
            return resolve_local_storage(storage[len("file://"):])
        return storage
    return resolve_local_storage(storage)


def resolve_local_storage(storage: str) -> str:
    p = Path(storage).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".raygpt-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.storage={storage!r} is not writable ({e.strerror})") from None
    return str(p)


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files go; the same object for `raygpt train`, Tune trials and
    `raygpt chaos`. With local storage, run_dir is Ray Train's experiment directory and
    checkpoints are written there in place; with a URI, checkpoints go to the URI
    through Ray and metrics/summary/plot are staged in a local run_dir, uploaded at the
    end."""
    storage: str
    name: str
    run_dir: Path
    run_uri: str | None

    @classmethod
    def resolve(cls, storage: str, name: str, staging_name: str | None = None) -> "RunPaths":
        if is_uri(storage):
            from raygpt.data.prepare import cache_dir

            run_dir = Path(cache_dir()) / "runs" / (staging_name or name)
            return cls(storage, name, run_dir, join_uri(storage, name))
        return cls(storage, name, Path(storage) / name, None)

    @property
    def ckpt_in_place(self) -> bool:
        return self.run_uri is None

    def shown(self) -> str:
        return redact_uri(join_uri(self.storage, self.name))


class RunInterrupted(UserError):
    """Ctrl-C: the run wrote a checkpoint at the step it reached and stopped."""

    def __init__(self, paths: RunPaths, step: int | None):
        self.paths, self.step = paths, step
        super().__init__(f"run '{paths.name}' interrupted" + (f" at step {step}" if step is not None else ""))


def default_name(cfg: Config) -> str:
    return f"{cfg.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _import_torch_meanwhile() -> threading.Thread:
    """The driver needs torch (the plan checks, Ray Train's torch trainer): ~2-3 s of
    import on a small machine. On a thread it overlaps ray.init, which mostly waits for
    Ray's processes to start. torch imports no Ray module, so the two imports share no
    half-imported module (no import-lock cycle); the main thread's own `import torch`
    then waits for this one or finds it done."""
    def run():
        try:
            import torch  # noqa: F401
        except Exception:  # noqa: BLE001 - the main thread's import reports it
            pass

    th = threading.Thread(target=run, name="raygpt-import-torch", daemon=True)
    th.start()
    return th


def init_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = True):
    """Join `address` (or RAY_ADDRESS), else start a local Ray (with its dashboard when
    `dashboard`). Returns whether Ray was started here."""
    import ray

    from raygpt.raycompat import check_ray_version

    check_ray_version()
    if ray.is_initialized():
        return False
    # Ray Train gives a worker group 60 s to start; importing torch in every worker on a
    # busy small machine can take longer. The controller inherits this from the raylet.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray starts workers at nice 15; on a small machine its own background processes
        # (nice 0) then keep preempting the training threads: ~4% tokens/s on 2 cores.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # torchft's Rust side (run.fault_tolerance=replica) logs every quorum at INFO.
        os.environ.setdefault("RUST_LOG", "warn")
        # "local": a fresh embedded instance, even if another Ray runs on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", log_to_driver=True)
    return True


def resolve_resources(cfg: Config, use_gpu: bool, embedded: bool) -> dict:
    """Per-worker resources. On the embedded local Ray, split this machine's cores among
    the workers (a 1-CPU worker gets OMP_NUM_THREADS=1 and trains ~1.4x slower)."""
    import ray

    cpus = cfg.run.cpus_per_worker
    if cpus is None:
        if embedded:
            total = ray.cluster_resources().get("CPU", 1)
            cpus = max(1.0, float(int(total // cfg.run.num_workers)))
        else:
            cpus = 1.0
    res = {"CPU": cpus, **cfg.run.resources_per_worker}
    if use_gpu:
        res["GPU"] = cfg.run.gpus_per_worker
    return res


def check_placeable(cfg: Config, per_worker: dict) -> None:
    """Return once the minimum number of workers can be placed: at once when the live
    nodes have room; after the autoscaler has added nodes when only it can make room
    (bounded by run.placement_timeout_s); fail at once when nothing ever could."""
    from raygpt.train.capacity import ensure_capacity

    ensure_capacity("run.num_workers", cfg.run.min_workers or cfg.run.num_workers, cfg.run.num_workers,
                    per_worker, timeout_s=cfg.run.placement_timeout_s)


def check_plans(cfg: Config, vocab_size: int, use_gpu: bool) -> None:
    """Resolve the parallel plan and batch geometry for every world size the run may
    take (an elastic run: each size in MIN..MAX), so a bad plan fails before workers."""
    from raygpt.model.gpt import GPTConfig
    from raygpt.parallel.plan import PlanError, resolve_plan
    from raygpt.train.loop import batch_geometry

    gcfg = GPTConfig.from_model_config(cfg.model, vocab_size)
    lo = cfg.run.min_workers or cfg.run.num_workers
    for world in range(lo, cfg.run.num_workers + 1):
        try:
            plan = resolve_plan(cfg.parallel, world, n_heads=gcfg.n_head, on_gpu=use_gpu)
            per_rank, _, _ = batch_geometry(cfg.train.global_batch, plan.dp, cfg.train.micro_batch)
            if plan.pp > 1:
                from raygpt.train.loop import pp_microbatches

                n_mb = pp_microbatches(cfg.train.pp_microbatches, per_rank, plan.pp)
                if cfg.parallel.pp_schedule == "interleaved" and n_mb % plan.pp:
                    raise PlanError(f"train.pp_microbatches={n_mb} must be a multiple of "
                                    f"parallel.pp_degree={plan.pp} for the interleaved schedule")
                if cfg.distill.teacher:
                    raise PlanError("distillation does not run with pipeline parallelism (parallel.pp_degree>1)")
        except UserError as e:
            if lo == cfg.run.num_workers:
                raise
            raise PlanError(f"{e} (the elastic range {lo}:{cfg.run.num_workers} includes world size {world})") from None


def check_existing_run(run_dir: Path, cfg: Config, vocab_size: int) -> int | None:
    """A resumed run must have the same model shape: check before starting workers."""
    from raygpt.model.gpt import GPTConfig
    from raygpt.train.checkpoint.discovery import latest_checkpoint
    from raygpt.train.checkpoint.io import check_compatible, read_state

    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    st = read_state(latest)
    gcfg = GPTConfig.from_model_config(cfg.model, vocab_size)
    check_compatible(st["model"], gcfg.__dict__, str(latest))
    return st["step"]


def build_trainer(cfg: Config, *, paths: RunPaths, data_dir: str | None, use_gpu: bool, per_worker: dict,
                  callbacks=None, inject: dict | None = None, run_id: str | None = None,
                  embedded: bool = False):
    import ray.train

    from raygpt.train.rayhooks import RaygptTorchTrainer
    from raygpt.train.worker import train_func

    cfg = cfg.model_copy(deep=True)
    cfg.run.cpus_per_worker = per_worker["CPU"]
    num_workers = cfg.run.num_workers
    if cfg.run.min_workers is not None and cfg.run.min_workers < num_workers:
        num_workers = (cfg.run.min_workers, cfg.run.num_workers)
    scaling = ray.train.ScalingConfig(
        num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
        elastic_resize_monitor_interval_s=cfg.run.elastic_resize_interval_s,
    )
    run_config = ray.train.RunConfig(
        name=paths.name,
        storage_path=paths.storage,
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        callbacks=callbacks,
        # Ray Train's INFO lines repeat every reported metric; ours are shorter.
        logging_config=ray.train.LoggingConfig(
            log_level=os.environ.get("RAYGPT_RAY_TRAIN_LOG_LEVEL", "WARNING")),
    )
    trainer = RaygptTorchTrainer(
        train_func,
        train_loop_config={"config": cfg.to_dict(), "data_dir": data_dir, "run_dir": str(paths.run_dir),
                           "run_uri": paths.run_uri, "ckpt_in_place": paths.ckpt_in_place,
                           "run_id": run_id, "inject": inject or {}},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=_torch_config(cfg, use_gpu),
    )
    trainer.embedded = embedded
    return trainer


def _torch_config(cfg: Config, use_gpu: bool):
    from raygpt.train.rayhooks import RaygptTorchConfig, RaygptTorchftConfig

    # A hung collective (a lost peer mid all-reduce) fails the group after this long
    # instead of torch's 30 min; the restart then resumes from a checkpoint.
    kw = {"backend": "nccl" if use_gpu else "gloo", "timeout_s": int(cfg.run.collective_timeout_s)}
    if cfg.run.fault_tolerance == "replica":
        from raygpt.parallel.replica import lighthouse_kwargs

        return RaygptTorchftConfig(lighthouse_kwargs=lighthouse_kwargs(), **kw)
    return RaygptTorchConfig(**kw)


def _gpu_available() -> bool:
    """GPUs on a live node, or on a node type the autoscaler can add."""
    from raygpt.train.capacity import gpus_possible, read_capacity

    return gpus_possible(read_capacity())


class _Progress:
    """Follows <run_dir>/metrics.jsonl from the driver and shows a live progress bar
    (only on a terminal; the workers' log lines are printed either way)."""

    def __init__(self, run_dir: Path, total: int):
        self.path = run_dir / "metrics.jsonl"
        self.total = total
        self._stop = threading.Event()

    def run(self):
        import sys

        if not sys.stdout.isatty():
            self._stop.wait()
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        pos = self.path.stat().st_size if self.path.exists() else 0
        with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      transient=True) as prog:
            task = prog.add_task("train", total=self.total, info="starting workers...")
            while not self._stop.wait(0.5):
                if not self.path.exists():
                    continue
                with open(self.path) as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                for line in chunk.splitlines():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if "step" in r:
                        info = []
                        if "loss" in r:
                            info.append(f"loss {r['loss']:.3f}")
                        if r.get("best_val_loss") is not None:
                            info.append(f"best val {r['best_val_loss']:.3f}")
                        if "tokens_per_s" in r:
                            info.append(f"{r['tokens_per_s']:,.0f} tok/s")
                        prog.update(task, completed=r["step"], info=" | ".join(info) or "")

    def stop(self):
        self._stop.set()


@dataclass
class Preflight:
    """What the driver settled before any worker starts."""
    cfg: Config
    data_dir: Path
    meta: dict
    use_gpu: bool
    embedded: bool
    per_worker: dict
    paths: RunPaths
    resume_step: int | None


def check_data(cfg: Config, data_dir: Path, meta: dict) -> None:
    """Data, tokenizer and model shape agree (pure checks)."""
    # Fine-tuning / distillation: token ids only mean something under the model's own
    # tokenizer (a new char tokenizer of other text maps characters elsewhere).
    from raygpt.data.tokenizer import check_same_tokenizer

    if cfg.train.init_from:
        check_same_tokenizer(cfg.train.init_from, data_dir, what="--init-from model")
    if cfg.distill.teacher:
        check_same_tokenizer(cfg.distill.teacher, data_dir, what="teacher")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < meta["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({meta['vocab_size']} in {data_dir}/meta.json)"
        )
    if cfg.model.block_size + 1 > meta.get("val_tokens", 10**12):
        raise ConfigError(
            f"model.block_size={cfg.model.block_size} is larger than the val split of "
            f"{data_dir} ({meta['val_tokens']} tokens)"
        )


def check_replica_mode(paths: "RunPaths") -> None:
    """run.fault_tolerance=replica: torchft installed; checkpoints written in place (the
    run keeps them itself: no Ray report, raygpt.train.replica)."""
    from raygpt.parallel.replica import torchft_missing

    why = torchft_missing()
    if why:
        raise UserError(why)
    if not paths.ckpt_in_place:
        raise UserError(f"run.fault_tolerance=replica needs run.storage on a file system every node sees "
                        f"(a local path or a shared mount), not {redact_uri(paths.storage)}")


def preflight(cfg: Config) -> Preflight:
    """Pure checks first, then anything that asks the cluster for nodes, last (a request
    made there is withdrawn by run_training's finally, whatever fails after it)."""
    from raygpt.data.prepare import ensure_data, read_meta

    storage = resolve_storage(cfg)
    paths = RunPaths.resolve(storage, cfg.run.name or default_name(cfg))
    # The driver prepares (or checks) the data so that errors show before workers start.
    data_dir = ensure_data(cfg.data)
    meta = read_meta(data_dir)
    check_data(cfg, data_dir, meta)
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu is not None else _gpu_available()
    if use_gpu and not _gpu_available():
        raise UserError("--use-gpu was given but the Ray cluster has no GPU and no autoscaler "
                        "node type with GPUs")
    embedded = not (cfg.run.address or os.environ.get("RAY_ADDRESS"))
    check_plans(cfg, meta["vocab_size"], use_gpu)
    if cfg.run.fault_tolerance == "replica":
        check_replica_mode(paths)
    resume_step = None
    if paths.run_uri is None:
        resume_step = check_existing_run(paths.run_dir, cfg, meta["vocab_size"])
    per_worker = resolve_resources(cfg, use_gpu, embedded)
    check_placeable(cfg, per_worker)  # last: it may ask the autoscaler for nodes
    return Preflight(cfg, data_dir, meta, use_gpu, embedded, per_worker, paths, resume_step)


def train_env_defaults(cfg: Config) -> None:
    """Ray Train's own timeouts, as backstops behind raygpt's hang watchdog (read by its
    controller from the driver's environment at fit()): a worker whose health-check poll
    hangs (its whole process frozen) is dead after the init timeout, not 600 s; Ray's
    barrier behind `report` does not wait forever."""
    t = str(int(cfg.run.init_timeout_s))
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", t)
    os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", t)
    # Drain notices are raygpt's (raygpt.train.preemption: a 1 s poll, a checkpoint, a
    # move off the node at once); Train's watcher (a 5 s poll, an actor per group, then
    # a wait until the deadline) would only add a second reaction to the same notice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The controller polls its workers this often (Ray: every 2 s): a finished run ends
    # and a dead worker is seen up to 1.5 s sooner; a poll is one small call per worker.
    if cfg.run.num_workers <= 64:
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


class _Launch:
    """One fit() with what runs beside it on the driver: progress bar, hang watchdog,
    drain watch, signal handlers put back after."""

    def __init__(self, pre: Preflight, inject: dict | None, progress: bool, owns_ray: bool = False):
        from raygpt.train.links import LinkStragglerDetector
        from raygpt.train.preemption import DrainWatch
        from raygpt.train.watchdog import HangWatchdog, ReplicaWatchdog

        self.pre, self.run_id = pre, uuid.uuid4().hex
        cfg, paths = pre.cfg, pre.paths
        self.trainer = build_trainer(cfg, paths=paths, data_dir=str(pre.data_dir), use_gpu=pre.use_gpu,
                                     per_worker=pre.per_worker, inject=inject, run_id=self.run_id,
                                     embedded=owns_ray)
        self.prog = _Progress(paths.run_dir, cfg.train.max_steps) if progress else None
        dog = ReplicaWatchdog if cfg.run.fault_tolerance == "replica" else HangWatchdog
        self.watchdog = dog(self.run_id, paths.run_dir, cfg.run.hang_timeout_s, cfg.run.init_timeout_s,
                                     on_verdict=self._record_hang, on_link=self._record_link,
                                     links=LinkStragglerDetector(cfg.run.straggler_factor, cfg.run.straggler_steps))
        self.drains = DrainWatch(self.run_id, paths.run_dir, replica=cfg.run.fault_tolerance == "replica")

    def _record_hang(self, verdict: dict) -> None:
        from raygpt.train.metrics import append_event

        append_event(self.pre.paths.run_dir, "hang", **verdict)

    def _record_link(self, ev: dict) -> None:
        import sys

        from raygpt.train.metrics import append_event

        append_event(self.pre.paths.run_dir, "straggler", **ev)
        sys.stderr.write(f"raygpt: slow link: rank {ev['rank']} (node {str(ev['node'])[:8]}) round trip to the head "
                         f"{ev['rtt_ms']:.0f} ms, {ev['ratio']}x the others' ({ev['others_ms']:.0f} ms) over "
                         f"{ev['beats']} beats\n")

    def fit(self):
        import signal

        th = threading.Thread(target=self.prog.run, daemon=True) if self.prog else None
        if th:
            th.start()
        self.watchdog.start()
        self.drains.start()
        main = threading.current_thread() is threading.main_thread()
        old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            return self.trainer.fit()
        finally:
            for sig, h in old_handlers.items():  # the trainer's handlers stay installed otherwise
                signal.signal(sig, h)
            self.watchdog.stop()
            self.drains.stop()
            from raygpt.train.metrics import flush_events

            flush_events(self.pre.paths.run_dir)  # hang events the storage refused when they came
            if self.prog:
                self.prog.stop()
                th.join(timeout=2)


def failure_cause(text: str) -> str:
    """The line of a Ray Train error that says what went wrong: raygpt's own failure
    mark (worker.StepFailed), else Ray's health-check / actor-death line, else the first."""
    i = text.find("[raygpt-failure ")
    if i >= 0:
        return (text[text.find("]", i) + 1:].strip().splitlines() or [""])[0]
    for line in text.splitlines():
        if "health check" in line or "died" in line.lower():
            return line.strip()
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "unknown error")


def run_failed(paths: RunPaths, run_id: str, error: BaseException, hangs: list[dict]) -> "RunFailed":
    """A run that failed for good: the whole error in <run_dir>/failure.txt, one line for
    the user."""
    from raygpt.errors import RunFailed
    from raygpt.train.metrics import write_text_atomic
    from raygpt.train.rayhooks import REPEATED_KEY

    where = paths.run_dir / "failure.txt"
    try:
        write_text_atomic(where, f"{type(error).__name__}: {error}\n")
    except OSError:
        where = None
    cause = failure_cause(str(error))
    repeated = None
    try:
        from raygpt import raycompat

        repeated = raycompat.kv_get(REPEATED_KEY.format(run_id=run_id), namespace="raygpt")
    except Exception:
        pass
    why = ("the same failure at the same step twice: not restarted again" if repeated
           else "its restart budget (run.max_failures) is spent")
    extra = f"; {len(hangs)} hang(s) detected" if hangs else ""
    return RunFailed(f"run '{paths.name}' failed ({why}{extra}): {cause[:300]}"
                     + (f"; details in {where}" if where else ""))


def finish_summary(pre: Preflight, result, interrupted: bool) -> dict:
    """summary.json with the checkpoint the run ended on (or RunInterrupted)."""
    from raygpt.train.metrics import read_uri_json, upload_dir, write_json_atomic

    from raygpt.train.report import close_launch

    paths, storage = pre.paths, pre.paths.storage
    run_dir, run_uri = paths.run_dir, paths.run_uri
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    elif run_uri:  # rank 0 ran on another node
        summary = read_uri_json(join_uri(run_uri, "summary.json")) or {}
    goodput = close_launch(run_dir, "interrupted" if interrupted else "finished", summary.get("steps"))
    if goodput is not None:
        summary["goodput"] = goodput
    if interrupted:
        if goodput is not None and summary:
            write_json_atomic(run_dir / "summary.json", summary)
        from raygpt.train.checkpoint.discovery import latest_checkpoint
        from raygpt.train.checkpoint.io import read_state

        latest = latest_checkpoint(run_dir) if run_uri is None else None
        raise RunInterrupted(paths, read_state(latest)["step"] if latest else summary.get("steps"))
    ck = result.checkpoint.path if result.checkpoint else None
    if ck is None and pre.cfg.run.fault_tolerance == "replica":  # no Ray report in this mode
        from raygpt.train.checkpoint.discovery import latest_checkpoint

        latest = latest_checkpoint(run_dir)
        ck = str(latest) if latest else None
    if ck and run_uri and not is_uri(ck):
        # Ray gives the path without scheme and query; put both back.
        scheme, _, rest = storage.partition("://")
        query = storage.partition("?")[2]
        ck = f"{scheme}://{ck}" + (f"?{query}" if query else "")
    summary["checkpoint"] = ck
    summary["run_dir"] = redact_uri(run_uri) if run_uri else str(run_dir)
    try:
        write_json_atomic(run_dir / "summary.json", summary)
    except OSError as e:  # the run is done and its checkpoints stand: say so, do not fail it
        from raygpt.errors import describe_os_error

        print(f"raygpt: warning: summary.json not written ({describe_os_error(e)}); the summary is "
              "returned (and printed by raygpt train)", flush=True)
    if run_uri:
        upload_dir(run_dir, run_uri)
    return summary


def run_training(cfg: Config, *, progress: bool = True, inject: dict | None = None) -> dict:
    """Run (or resume) a training job: preflight, launch, summary. Returns summary.json's
    contents. inject: fault injection for tests and chaos runs (see raygpt.train.worker)."""
    import ray

    from raygpt.config import check_paths, dump_config

    t_launch = time.time()  # the goodput ledger's wall time starts here (Ray start included)
    if inject is None and os.environ.get("RAYGPT_INJECT"):  # fault injection for end-to-end tests
        inject = json.loads(os.environ["RAYGPT_INJECT"])
    check_paths(cfg)  # before Ray starts
    _import_torch_meanwhile()
    started = init_ray(cfg.run.address, dashboard=cfg.run.dashboard)
    embedded = not (cfg.run.address or os.environ.get("RAY_ADDRESS"))
    try:
        from raygpt import raycompat

        raycompat.start_autoscaling_coordinator()  # starts while the run is prepared
    except Exception:  # noqa: BLE001 - only a head start: the controller creates it anyway
        pass
    try:
        pre = preflight(cfg)
        paths = pre.paths
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, paths.run_dir / "config.yaml")
        from raygpt.train.metrics import append_event

        append_event(paths.run_dir, "launch", started=round(t_launch, 3), resume_step=pre.resume_step)
        print(f"raygpt: run '{paths.name}' -> {paths.shown()}"
              + (f" (resuming from step {pre.resume_step})" if pre.resume_step is not None else ""), flush=True)
        train_env_defaults(cfg)
        launch = _Launch(pre, inject, progress, owns_ray=started)
        from ray.train import TrainingFailedError

        try:
            result = launch.fit()
            if result.error:
                raise result.error
        except TrainingFailedError as e:  # fit() raises it in Train V2; older paths return it
            from raygpt.train.report import close_failed_launch

            close_failed_launch(paths.run_dir)
            raise run_failed(paths, launch.run_id, e, launch.watchdog.verdicts) from None
        return finish_summary(pre, result, launch.trainer.interrupted)
    finally:
        if not embedded:
            from raygpt.train.capacity import request_workers

            try:
                request_workers([])  # withdraw our demand: idle nodes go after the idle timeout
            except Exception:
                pass
        if started:
            ray.shutdown()
