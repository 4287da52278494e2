"""The training loop without Ray: a `Trainer` holds the model parts (one for a plain or
wrapped model, one per pipeline stage), their optimizers, the data loaders, the parallel
plan and a CheckpointManager, and runs `train()` = restore, then `train_step()` until
max_steps with logging, `evaluate()`, checkpoints and stop requests.

It needs an initialized torch.distributed process group (a one-rank gloo group is
enough: tests run it so, without Ray). What depends on the runtime (reporting to Ray
Train, stop requests, preemption notices, fault injection) comes in through `Hooks`;
raygpt.train.worker is the Ray adapter.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from raygpt.config import Config
from raygpt.errors import UserError
from raygpt.train.heartbeat import Progress
from raygpt.train.stragglers import ComputeClock, StragglerDetector

# Stop reasons, in the order one wins over another when ranks disagree.
STOP_NONE, STOP_INTERRUPT, STOP_SIGTERM, STOP_PREEMPT, STOP_TIME_LIMIT = 0, 1, 2, 3, 4
STOP_NAMES = {STOP_INTERRUPT: "interrupt", STOP_SIGTERM: "sigterm", STOP_PREEMPT: "preemption",
              STOP_TIME_LIMIT: "time_limit"}


class _StopFlag:
    """Set from a signal handler (main thread) or a watcher thread; read by the loop."""

    def __init__(self):
        self._code = STOP_NONE
        self._lock = threading.Lock()
        self.notice: dict | None = None  # the drain notice behind STOP_PREEMPT

    def set(self, code: int, notice: dict | None = None) -> None:
        with self._lock:
            self._code = max(self._code, code)
            if notice is not None:
                self.notice = notice

    def get(self) -> int:
        return self._code

    def clear(self) -> None:
        with self._lock:
            self._code = STOP_NONE


STOP = _StopFlag()


def install_sigterm_handler() -> bool:
    """SIGTERM (spot reclaim, node drain) sets STOP instead of killing the process; the
    loop checkpoints at the next step and then exits. Must run on the process's main
    thread (Ray Train runs the training function on another one: the adapter has the
    worker actor run this on its main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    # Cleared here, once per process before its training function starts, never after:
    # a SIGTERM that arrives while the worker still prepares its data must stand.
    STOP.clear()
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set(STOP_SIGTERM))
    return True


class Stopped(RuntimeError):
    """Raised after the checkpoint a SIGTERM asked for (the runtime restarts from it)."""


class CheckpointUnwritable(RuntimeError):
    """The run's last checkpoint could not be written: its steps would be lost."""


class Preempted(Stopped):
    """Raised after the checkpoint a drain notice asked for: the group restarts from it
    off the draining nodes, without charging the failure budget."""


def log(rank: int, msg: str) -> None:
    # Not print(): Ray Train patches print into a logger that echoes each line twice.
    if rank == 0:
        sys.stdout.write(f"[raygpt] {msg}\n")
        sys.stdout.flush()


def dropout_seed(seed: int, dp_rank: int) -> int:
    """The generator seed of a data-parallel rank: dropout masks differ across DP ranks
    (they see different sequences) and agree across the TP/PP ranks of one replica."""
    return (int(seed) * 1_000_003 + 7919 * (dp_rank + 1)) % (2**63 - 1)


def threads(cfg: Config) -> int:
    return max(1, int(cfg.run.cpus_per_worker or 1))


def amp_dtype(cfg: Config, device: torch.device):
    if cfg.train.dtype == "float32":
        return None
    if cfg.train.dtype == "bfloat16" or device.type == "cuda":
        return torch.bfloat16
    return None


def build_model(cfg: Config, vocab_size: int):
    from raygpt.model.gpt import GPT, GPTConfig

    gcfg = GPTConfig.from_model_config(cfg.model, vocab_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = GPT(gcfg)
    if cfg.train.init_from:
        from raygpt.model.io import load_model_dir

        src, _ = load_model_dir(cfg.train.init_from)
        model.load_state_dict(src.state_dict())
    apply_freeze(model, cfg.train.freeze)
    return model, gcfg


def apply_freeze(model, freeze: list[str]) -> list[str]:
    """train.freeze: "embeddings" and/or "blocks:N". Returns frozen parameter names."""
    frozen = []
    for item in freeze:
        if item == "embeddings":
            mods = [model.wte, model.wpe]
        elif item.startswith("blocks:"):
            try:
                n = int(item.split(":", 1)[1])
            except ValueError:
                raise UserError(f"train.freeze entry {item!r}: expected blocks:N") from None
            if not 0 < n <= len(model.blocks):
                raise UserError(f"train.freeze={item!r}: the model has {len(model.blocks)} blocks")
            mods = list(model.blocks.values())[:n]
        else:
            raise UserError(f"train.freeze entry {item!r}: expected 'embeddings' or 'blocks:N'")
        for m in mods:
            for name, p in m.named_parameters():
                p.requires_grad_(False)
                frozen.append(name)
    return frozen


def _noop(*a, **k):
    return None


@dataclass
class Hooks:
    """What the runtime gives the Trainer (all optional)."""
    report_metrics: Callable[[dict], None] = _noop          # eval-step metrics
    report_checkpoint: Callable[..., None] = _noop          # (path, step, metrics, mode)
    stop_code: Callable[[], int] = STOP.get                 # local stop request (STOP_*)
    after_step: Callable[["Trainer", int], None] = _noop    # fault injection (chaos holds)
    before_save: Callable[[int], None] = _noop              # fault injection (crash in save)
    before_step: Callable[["Trainer", int], None] = _noop   # fault injection (hang, slow), data phase
    progress: Progress = field(default_factory=Progress)    # where this rank is (hang watchdog)
    node_id: Callable[[], str] = lambda: ""                 # this rank's node (straggler events)
    on_straggler: Callable[[dict], None] = _noop            # rank 0, per straggler event (the drain policy)
    drain_notice: Callable[[], dict | None] = lambda: None  # this group's drain notice, read now


@dataclass
class _Window:
    """Figures between two log steps."""
    seconds: float = 0.0
    steps: int = 0
    loss: Any = None
    rank_data_s: list = field(default_factory=list)     # per rank, summed over the window
    rank_compute_s: list = field(default_factory=list)
    stall_s: float = 0.0  # replica mode: steps the quorum did not commit (a peer lost mid-step)

    def add_ranks(self, data_s: list[float], compute_s: list[float]) -> None:
        if not self.rank_data_s:
            self.rank_data_s, self.rank_compute_s = [0.0] * len(data_s), [0.0] * len(data_s)
        for r, (d, c) in enumerate(zip(data_s, compute_s)):
            self.rank_data_s[r] += d
            self.rank_compute_s[r] += c


@dataclass
class Trainer:
    cfg: Config
    data_dir: Path
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    run_dir: Path | None = None        # metrics/summary (rank 0 writes)
    ckpt_root: Path | None = None      # where checkpoints go in place (None: temp dirs)
    hooks: Hooks = field(default_factory=Hooks)
    use_async: bool | None = None      # None: async saves on GPU only
    # run.fault_tolerance=replica: (this replica's index, replicas); torch.distributed is
    # then a group of one and the quorum (raygpt.train.replica) does the data parallelism
    replica_of: tuple[int, int] | None = None

    def __post_init__(self):
        from raygpt.data.prepare import read_meta

        self.data_dir = Path(self.data_dir)
        self.meta = read_meta(self.data_dir)
        self.tokenizer_path = self.data_dir / "tokenizer.json"
        self.member = None  # raygpt.train.replica.ReplicaMember in replica mode
        self._build_model()
        self._build_groups()
        self.train_loader = self._loader("train")
        self.val_loader = self._loader("val")
        from raygpt.train.checkpoint.manager import CheckpointManager

        if self.use_async is None:
            self.use_async = self.cfg.checkpoint.async_save and self.device.type == "cuda"
        self.ckpt = CheckpointManager(
            # a replica's leader saves the whole model alone: rank 0 of its group of one
            self.cfg.checkpoint, rank=0 if self.member else self.rank, world=self.world, ckpt_root=self.ckpt_root,
            report=self.hooks.report_checkpoint, use_async=self.use_async, cpu_group=self.ckpt_group,
            device=self.device, tokenizer_path=self.tokenizer_path, on_event=self._event,
            before_write=self.hooks.before_save)
        self.step = self.start_step = 0
        self.best_val, self.last_val = float("inf"), None
        self.train_seconds_prev = self.train_time = 0.0
        self.horizon = self.cfg.optim.decay_steps or self.cfg.train.max_steps
        self.last_rec: dict = {}
        self.restored_from = None
        self._saved_at = -1
        from raygpt.train.metrics import RunWriter

        self.writer = RunWriter(self.run_dir or ".", enabled=(self.rank == 0 or self.member is not None)
                                and self.run_dir is not None)
        if self.member is not None:  # every replica may lead; replica 0 until the first quorum says
            self.writer.enabled = self.writer.enabled and self.rank == 0
        self.progress = self.hooks.progress
        self.clock = ComputeClock(self.device)
        self.stragglers = StragglerDetector(self.cfg.run.straggler_factor, self.cfg.run.straggler_steps)
        self._data_s = 0.0
        # The goodput ledger's inputs (raygpt.train.goodput): what this group's start cost
        # (set by the runtime adapter) and its first step's time (compile, warm-up).
        self.startup: dict = {}
        self._first_step_s: float | None = None
        self.auto = None  # checkpoint.every=auto: rank 0's AutoInterval (set at _start)
        self.deadline: float | None = None  # run.time_limit_s: rank 0's end of this launch (epoch s)

    # ---------------------------------------------------------------- build
    def _build_model(self) -> None:
        from raygpt.parallel.apply import parallelize
        from raygpt.parallel.plan import resolve_plan
        from raygpt.train.loop import batch_geometry, build_optimizer

        cfg, device = self.cfg, self.device
        model, self.gcfg = build_model(cfg, self.meta["vocab_size"])
        self.n_params, self.flops_per_token = model.num_params(), model.flops_per_token()
        mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        self.plan = resolve_plan(cfg.parallel, self.world, n_heads=self.gcfg.n_head, n_params=self.n_params,
                                 device_memory=mem, on_gpu=device.type == "cuda")
        mesh = self.plan.build_mesh(device.type)
        self.dp_rank, self.dp = self.plan.dp_rank(self.rank), self.plan.dp
        group = None
        if self.replica_of is not None:
            group = self._replica_group()
            self.dp_rank, self.dp = self.replica_of
        per_rank, self.micro, self.accum = batch_geometry(cfg.train.global_batch, self.dp,
                                                          cfg.train.micro_batch)
        self.amp = amp_dtype(cfg, device)
        mp = self.amp if self.plan.shard > 1 else None
        self.pipe = None
        if self.plan.pp > 1:
            from raygpt.parallel.pipeline import Pipeline
            from raygpt.train.loop import pp_microbatches

            n_mb = pp_microbatches(cfg.train.pp_microbatches, per_rank, self.plan.pp)
            self.pipe = Pipeline(model, self.plan, mesh, cfg.parallel, device, n_mb, mp_dtype=mp,
                                 amp_dtype=None if mp is not None else self.amp)
            self.parts = list(self.pipe.parts)
            self.micro, self.accum = per_rank // n_mb, n_mb
        else:
            self.parts = [parallelize(model, self.plan, mesh, cfg.parallel, device, mp_dtype=mp)]
        if group is not None:
            self.parts = [group.wrap(self.parts[0])]
        self.optimizers = [build_optimizer(p, cfg.optim, device.type) for p in self.parts]
        if group is not None:
            from raygpt.train.replica import ReplicaMember

            self.member = ReplicaMember(self, group)
        if mp is not None:
            self.amp = None  # FSDP's mixed-precision policy casts; no autocast on top
        self.teacher = self._load_teacher() if cfg.distill.teacher and self.pipe is None else None
        from raygpt.parallel.compile_cache import CompileCache, key_parts

        # torch.compile compiles at the first call: the kept artifacts load before it.
        self.compile_cache = CompileCache(
            self.run_dir, key_parts(cfg, self.plan, device, self.micro, self.amp, self.meta["vocab_size"]),
            self.rank, enabled=cfg.parallel.compile and cfg.parallel.compile_cache,
            log=lambda m: log(self.rank, m))
        self.compile_cache.load()
        # Dropout streams: per data-parallel rank (a restore may replace them).
        torch.manual_seed(dropout_seed(cfg.train.seed, self.dp_rank))

    def _replica_group(self):
        from raygpt.parallel.replica import ReplicaGroup

        run = self.cfg.run
        # A collective with a lost peer fails after this (the step is redone without
        # it); a quorum waits up to init_timeout_s (a replacement's start).
        return ReplicaGroup(*self.replica_of, self.device, timeout_s=run.hang_timeout_s or 10.0,
                            quorum_timeout_s=run.init_timeout_s)

    def reseed_dropout(self, step: int) -> None:
        """Fresh dropout streams, a function of (seed, data-parallel rank, step)."""
        torch.manual_seed(dropout_seed(self.cfg.train.seed, self.dp_rank) + step)

    @property
    def plan_desc(self) -> str:
        return f"replica x{self.replica_of[1]} (ddp over a torchft quorum)" if self.replica_of else self.plan.describe()

    @property
    def devices(self) -> int:
        """Data-parallel workers of the run: the world, or the replicas."""
        return self.replica_of[1] if self.replica_of else self.world

    def _load_teacher(self):
        from raygpt.model.io import load_model_dir

        cfg = self.cfg
        teacher, _ = load_model_dir(cfg.distill.teacher, device=self.device)
        teacher.requires_grad_(False)
        if teacher.config.vocab_size < self.gcfg.vocab_size and teacher.config.vocab_size < self.meta["vocab_size"]:
            raise UserError(f"distill.teacher {cfg.distill.teacher}: vocabulary {teacher.config.vocab_size} "
                            f"is smaller than the data's {self.meta['vocab_size']}")
        log(self.rank, f"distilling from {cfg.distill.teacher} ({teacher.num_params() / 1e6:.2f}M params, "
                       f"T={cfg.distill.temperature}, alpha={cfg.distill.alpha})")
        return teacher

    def _build_groups(self) -> None:
        """Two CPU (gloo) groups, also at world size 1 and beside an NCCL-only default
        group: one for DCP's async save (it needs a CPU backend and runs its collectives
        on a background thread), one for the per-step agreement on stops and finished
        saves (a collective that must not interleave with the save's)."""
        import datetime

        import torch.distributed as dist

        self.ckpt_group = self.ctl_group = None
        if dist.is_available() and dist.is_initialized():
            t = datetime.timedelta(seconds=self.cfg.run.collective_timeout_s)
            self.ckpt_group = dist.new_group(backend="gloo", timeout=t)
            self.ctl_group = dist.new_group(backend="gloo", timeout=t) if self.world > 1 else None

    def _loader(self, split: str):
        from raygpt.data.loader import BatchLoader

        # Val always samples at random (a fixed, seeded set of windows per eval).
        return BatchLoader(self.data_dir, split, self.gcfg.block_size, self.cfg.train.global_batch,
                           self.cfg.train.seed, self.dp_rank, self.dp,
                           sampling=self.cfg.data.sampling if split == "train" else "random")

    # ---------------------------------------------------------------- state
    def _rng_meta(self) -> dict:
        return {"world_size": self.world, "plan": self.plan_desc}

    def trainer_state(self) -> dict:
        return {"step": self.step, "world_size": self.devices, "plan": self.plan_desc,
                "accum": self.accum, "micro_batch": self.micro,
                "best_val_loss": self.best_val if self.best_val < float("inf") else None,
                "val_loss": self.last_val, "train_seconds": self.train_seconds_prev + self.train_time,
                "decay_steps": self.horizon, "model": dict(self.gcfg.__dict__),
                "config": self.cfg.to_dict(), "data_position": self.train_loader.position(self.step)}

    def restore(self, path: str | Path) -> int:
        """Every rank: load model/optimizer state (resharded to this plan), RNG and
        schedule horizon from a checkpoint directory. Returns its step."""
        from raygpt.train.checkpoint.io import check_compatible, load_checkpoint, read_state
        from raygpt.train.checkpoint.rng import load_rng

        saved = read_state(path)
        check_compatible(saved["model"], self.gcfg.__dict__, str(path))
        load_checkpoint(path, self.parts, self.optimizers)
        self.step = self.start_step = saved["step"]
        self.best_val = saved.get("best_val_loss") or float("inf")
        self.train_seconds_prev = saved.get("train_seconds", 0.0)
        # The cosine horizon of the run's first start (raising max_steps later does not
        # bend the part of the schedule already walked); an explicit decay_steps wins.
        self.horizon = self.cfg.optim.decay_steps or saved.get("decay_steps") or self.horizon
        if not load_rng(path, self.rank, self._rng_meta()):
            self.reseed_dropout(self.step)  # another rank layout: fresh streams
        old = saved.get("world_size")
        if old != self.devices:
            log(self.rank, f"resize: world size {old} -> {self.devices} at step {self.step}: plan "
                           f"{saved.get('plan')} -> {self.plan_desc}, accumulation "
                           f"{saved.get('accum')} -> {self.accum} (global batch {self.cfg.train.global_batch} kept)")
        self.restored_from = str(path)
        self._saved_at = self.step
        log(self.rank, f"restored step {self.step} from {path}")
        return self.step

    # ---------------------------------------------------------------- steps
    def lr(self, step: int) -> float:
        from raygpt.train.loop import lr_at

        o = self.cfg.optim
        return lr_at(step, o.lr, o.min_lr, o.warmup_steps, self.horizon)

    def train_step(self):
        """One optimizer step at self.step (then self.step += 1). -> (loss, grad norm), or
        None for a step the replica quorum did not commit (redone next)."""
        from raygpt.train.loop import pp_train_step, train_step

        if self.member is not None:
            self.progress.mark("quorum", self.step + 1)  # may wait for a replacement to join
            self.step = self.member.begin()
        lr = self.lr(self.step)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        self.progress.mark("data", self.step + 1)
        t0 = time.perf_counter()
        self.hooks.before_step(self, self.step + 1)
        batch = self.train_loader.get(self.step) if self.pipe is not None else \
            self.train_loader.get_micro(self.step, self.micro)
        self._data_s = time.perf_counter() - t0
        self.progress.mark("compute")
        if self.pipe is not None:
            out = pp_train_step(self.pipe, self.optimizers, *batch, self.device, self.cfg.optim.grad_clip)
        else:
            out = train_step(self.parts[0], self.member.gated if self.member else self.optimizers[0],
                             batch, self.device, self.amp,
                             self.cfg.optim.grad_clip, teacher=self.teacher, distill=self.cfg.distill,
                             clock=self.clock)
        if self.member is not None:
            if not self.member.committed:
                return None
            self.step = self.member.group.step
            self.member.committed_with = self.member.group.participants()
            return out
        self.step += 1
        return out

    def evaluate(self) -> float:
        from raygpt.train.loop import evaluate

        if self.pipe is not None:
            vl = torch.stack([self.pipe.eval_loss(*self.val_loader.get(k), self.device)
                              for k in range(self.cfg.train.eval_steps)]).mean()
        else:
            vl = evaluate(self.parts[0], self.val_loader, self.cfg.train.eval_steps, self.micro, self.device,
                          self.amp)
        return self.all_mean(vl)

    def all_mean(self, t: torch.Tensor) -> float:
        """Mean over ranks; with a pipeline only the last stage's ranks hold a loss."""
        if self.member is not None:
            return self.member.mean(t)
        if self.world > 1:
            import torch.distributed as dist

            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= (self.plan.dp * self.plan.tp) if self.pipe is not None else self.world
        return float(t)

    def _agree(self, win: "_Window") -> tuple[int, bool]:
        """(stop code, every rank's async save done), and every rank's own-work times
        for the straggler check: one tiny CPU all-gather a step."""
        self.progress.mark("agree", self.step)
        code, busy = int(self.hooks.stop_code()), not self.ckpt.local_done()
        if self.deadline is not None and time.time() >= self.deadline:
            code = max(code, STOP_TIME_LIMIT)
        compute_s = self.clock.take()
        self.progress.last_compute_s = compute_s
        # rank 0's checkpoint.every=auto verdict rides along: every rank saves at the next step
        want = int(self.auto is not None and self.auto.due(time.time()))
        mine = [code, int(busy), int(1e6 * self._data_s), int(1e6 * compute_s), want]
        rows = [mine]
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor(mine, dtype=torch.int64)
            out = [torch.zeros_like(t) for _ in range(self.world)]
            dist.all_gather(out, t, group=self.ctl_group)
            rows = [o.tolist() for o in out]
        elif self.member is not None:
            rows = self.member.rows(mine)
        code, busy = max(r[0] for r in rows), any(r[1] for r in rows)
        self.ckpt.requested = self.ckpt.requested or any(r[4] for r in rows)
        data_s, compute_s = [r[2] / 1e6 for r in rows], [r[3] / 1e6 for r in rows]
        win.add_ranks(data_s, compute_s)
        for ev in self.stragglers.update(self.step, [d + c for d, c in zip(data_s, compute_s)]):
            log(self.rank, f"straggler: rank {ev['rank']} (node {str(ev['node'])[:8]}) takes {ev['ratio']:.2f}x "
                           f"the others' median for its own work ({ev['own_ms']:.0f} vs "
                           f"{ev['others_median_ms']:.0f} ms) for {ev['steps']} steps")
            self.writer.event("straggler", **ev)
            if self.rank == 0 and ev.get("node") and self.cfg.run.straggler_policy == "drain":
                log(self.rank, f"straggler policy: asking for node {ev['node'][:8]} to be drained; "
                               "the run goes on without it")
                self.hooks.on_straggler(ev)
        return code, not busy

    # ---------------------------------------------------------------- checkpoints
    def save(self, metrics: dict | None = None, final: bool = False) -> None:
        if self._saved_at == self.step:
            return
        self._saved_at = self.step
        if self.member is not None and not self.member.is_leader:
            return  # the leader holds the same state and saves it alone
        self.progress.mark("checkpoint")
        blocked = self.ckpt.save(self.step, self.parts, self.optimizers, self.trainer_state(),
                                 dict(metrics or {"step": self.step}), self._rng_meta(), final=final)
        if self.auto is not None:
            self.auto.saved(time.time(), blocked)
            self._log_interval()

    def _read_run_history(self) -> None:
        """Rank 0, at a group's start, from the run's metrics.jsonl (every launch):
        checkpoint.every=auto's inputs (failures, wall time, save costs) and
        run.time_limit_s's deadline (from this launch's start). Rank 0 decides both; the
        per-step agreement carries its verdicts to every rank."""
        auto, limit = self.cfg.checkpoint.every == "auto", self.cfg.run.time_limit_s
        if self.rank != 0 or not (auto or limit):
            return
        from raygpt.train.ckpt_interval import AutoInterval, History

        now, recs = time.time(), []
        if self.run_dir is not None:
            from raygpt.train.metrics import read_metrics

            try:
                recs = read_metrics(self.run_dir)
            except (OSError, ValueError) as e:  # no history: the priors, and the limit from now
                log(self.rank, f"the run's metrics.jsonl is unreadable ({e}): no history for "
                               "checkpoint.every=auto / run.time_limit_s")
        if limit:
            launches = [r["started"] for r in recs if r.get("event") == "launch" and "started" in r]
            self.deadline = (launches[-1] if launches else now) + limit
        if auto:
            self.auto = AutoInterval(self.cfg.run.mtbf_s, History.from_records(recs, now), now)

    def _log_interval(self) -> None:
        c = self.auto.changed(time.time())
        if c is None:
            return
        log(self.rank, f"checkpoint.every=auto: a save every {c['interval_s']:.0f} s = sqrt(2 x save "
                       f"{c['save_s']:.2f} s x MTBF {c['mtbf_s']:.0f} s) (save: {c['save_from']}; MTBF "
                       f"{c['mtbf_from']})")
        self.writer.event("checkpoint_interval", step=self.step, **c)

    def checkpoint_now(self) -> None:
        """A complete, reported checkpoint at this step (every rank calls it)."""
        self.save(final=True)
        self.ckpt.wait()

    def _save_final(self, metrics: dict) -> None:
        """The last save of a run has no next interval: one the storage refuses is tried
        again (2, 4, 8, ... s, up to checkpoint.final_retry_s in all). Every rank sees
        the same failure (DCP), so every rank retries in step. Gives up with an error
        naming the step and the storage's reason."""
        import time as _t

        failed = self.ckpt.failed_saves
        self.save(metrics, final=True)
        waited, delay = 0.0, 2.0
        while self.ckpt.failed_saves > failed and waited < self.cfg.checkpoint.final_retry_s:
            delay = min(delay, self.cfg.checkpoint.final_retry_s - waited)
            log(self.rank, f"final checkpoint at step {self.step} refused by the storage; "
                           f"trying again in {delay:.0f} s")
            _t.sleep(delay)
            waited += delay
            delay *= 2
            failed = self.ckpt.failed_saves
            self._saved_at = None
            self.save(metrics, final=True)
        if self.ckpt.failed_saves > failed:
            raise CheckpointUnwritable(f"the final checkpoint at step {self.step} could not be written "
                                       f"(tried for {waited:.0f} s): the storage refuses it")

    # ---------------------------------------------------------------- loop
    def _event(self, name: str, **kw) -> None:
        self.writer.event(name, **kw)

    def _log_record(self, win: _Window, gnorm, is_eval: bool, lr: float) -> dict:
        from raygpt.train.metrics import mfu, peak_flops

        rec = {"step": self.step, "lr": lr, "world_size": self.devices}
        if self.member is not None:
            rec["replicas"] = self.member.committed_with
        if win.steps:
            rec["loss"] = self.all_mean(win.loss / win.steps)
            rec["grad_norm"] = float(gnorm)
            tps = self.cfg.train.global_batch * self.gcfg.block_size * win.steps / max(win.seconds, 1e-9)
            rec["tokens_per_s"] = tps
            peak, note = peak_flops(self.device, threads(self.cfg))
            if peak is None and not getattr(self, "_mfu_note_shown", False):
                log(self.rank, note)  # unknown device: MFU omitted, never guessed
                self._mfu_note_shown = True
            rec["mfu"] = mfu(self.flops_per_token, tps, peak * self.devices if peak else None)
            rec["step_ms"] = 1000 * win.seconds / win.steps
            if win.rank_data_s:
                rec["rank_data_ms"] = [round(1000 * x / win.steps, 3) for x in win.rank_data_s]
                rec["rank_compute_ms"] = [round(1000 * x / win.steps, 3) for x in win.rank_compute_s]
            if self.stragglers.flagged:
                rec["stragglers"] = sorted(self.stragglers.flagged)
            if win.stall_s:
                rec["stall_s"] = round(win.stall_s, 4)
            if self.device.type == "cuda":
                rec["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                import resource

                rec["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self._first_step_s is not None:  # once per group, on its first record
            rec["first_step_ms"], self._first_step_s = round(1000 * self._first_step_s, 3), None
            rec.update(self.compile_cache.first_step_fields())
        if is_eval:
            self.progress.mark("eval")
            t_eval = time.perf_counter()
            self.last_val = self.evaluate()
            self.compile_cache.save()  # the eval graph, compiled at the first eval
            rec["eval_s"] = round(time.perf_counter() - t_eval, 4)
            self.best_val = min(self.best_val, self.last_val)
            rec["val_loss"] = self.last_val
        rec["best_val_loss"] = self.best_val if self.best_val < float("inf") else None
        rec["train_seconds"] = self.train_seconds_prev + self.train_time
        return rec

    def _print(self, rec: dict, is_eval: bool) -> None:
        t = self.cfg.train
        log(self.rank, f"step {self.step}/{t.max_steps} | loss {rec.get('loss', float('nan')):.4f}"
                       + (f" | val {self.last_val:.4f}" if is_eval else "")
                       + f" | lr {rec['lr']:.2e} | {rec.get('tokens_per_s', 0):,.0f} tok/s"
                       + (f" | mfu {100 * rec['mfu']:.1f}%" if rec.get("mfu") is not None else "")
                       + f" | mem {rec.get('peak_mem_mb', 0):.0f}MB"
                       + (f" | straggler rank {','.join(map(str, rec['stragglers']))}" if rec.get("stragglers") else ""))

    def _start(self) -> None:
        joined = self.member is not None and self.member.healed_step is not None
        if not joined:  # a replacement must not prune the leader's save in flight
            self.ckpt.prune_unfinished(self.step)
        self._read_run_history()
        self.stragglers.nodes = self._gather_nodes()
        if joined:
            self.member.start_event()
            self.writer.enabled = False  # until a quorum makes it the leader
        self.writer.event("start", step=self.step, world_size=self.devices, plan=self.plan_desc,
                          micro_batch=self.micro, accum=self.accum, restored=self.restored_from is not None,
                          train_seconds=self.train_seconds_prev, **self.startup,
                          **self.compile_cache.start_fields())
        if self.auto is not None:  # after `start`: the ledger cuts groups at their start events
            self._log_interval()
        t = self.cfg.train
        log(self.rank, f"model {self.n_params / 1e6:.2f}M params | plan {self.plan_desc} | device "
                       f"{self.device} | global batch {t.global_batch} = dp {self.dp} x micro {self.micro} "
                       f"x accum {self.accum} | steps {self.step}->{t.max_steps}")

    def _gather_nodes(self) -> list[str]:
        """Every rank's node id (named in straggler events)."""
        mine = self.hooks.node_id()
        if self.world == 1 or self.ctl_group is None:
            return [mine]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, mine, group=self.ctl_group)
        return out

    def train(self) -> dict:
        """Run from self.step to max_steps (or a stop). Returns the summary; rank 0 also
        writes summary.json unless this segment ran no step."""
        t = self.cfg.train
        self._start()
        for m in self.parts:
            m.train()
        win = _Window(loss=torch.zeros((), device=self.device))
        gnorm, stopped = None, None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        from raygpt.train.profiling import StepProfiler

        prof = StepProfiler(self.run_dir, self.rank, getattr(t, "profile", None), self.device)
        # A step's time runs from the end of the previous one's (after its log, eval or
        # save) to the sync that ends it: the per-step agreement, hooks and profiler count,
        # so tokens/s is wall clock (on a GPU, unsynced steps only queue work).
        t_free = time.perf_counter()
        while self.step < t.max_steps:
            prof.step(self.step)
            out = self.train_step()
            if out is None:  # not committed by the replica quorum (a peer went away): redone
                now = time.perf_counter()
                win.stall_s, t_free = win.stall_s + now - t_free, now
                self.member.take_quorum_stall()  # inside this attempt's time already
                continue
            loss, gnorm = out
            lr = self.lr(self.step - 1)
            win.loss += loss
            win.steps += 1
            step = self.step
            is_log = step % t.log_every == 0 or step == t.max_steps
            is_eval = step % t.eval_every == 0 or step == t.max_steps
            is_ckpt = self.ckpt.due(step, t.max_steps)
            if (is_log or is_eval or is_ckpt) and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            dt, t_free = now - t_free, now
            if self.member is not None:  # a quorum that waited for a lost peer to age out: not step time
                wait = self.member.take_quorum_stall()
                dt -= wait
                win.stall_s += wait
            self.progress.step_done(dt)
            if self.step == self.start_step + 1:
                self._first_step_s = dt
                self.compile_cache.save()  # outside the timed step; its few ms go to the next
            self.train_time += dt
            win.seconds += dt
            if is_log or is_eval or is_ckpt:
                rec = self._log_record(win if (is_log or is_eval) else _Window(), gnorm, is_eval, lr)
                if is_log or is_eval:
                    win = _Window(loss=torch.zeros((), device=self.device))
                self.writer.log(rec)
                self.last_rec.update(rec)
                if is_log or is_eval:
                    self._print(rec, is_eval)
                if is_eval or is_ckpt:
                    report = {k: v for k, v in self.last_rec.items() if isinstance(v, (int, float))}
                    report.update(step=step, done=step == t.max_steps)
                    if is_ckpt and step == t.max_steps:
                        self._save_final(report)
                    elif is_ckpt:
                        self.save(report)
                    else:
                        self.hooks.report_metrics(report)
                t_free = time.perf_counter()  # logging, evals and save blocking are not step time
            code, saves_done = self._agree(win)
            if saves_done:
                self.ckpt.complete_pending()
            if code != STOP_NONE:
                stopped = STOP_NAMES[code]
                self._announce_stop(stopped, step)
                self.checkpoint_now()
                if stopped == "preemption":
                    self.writer.event("preemption_checkpoint", step=step, **self._deadline_left())
                break
            t_hook = time.perf_counter()
            self.progress.mark("hook", step)
            self.hooks.after_step(self, step)  # chaos hooks may hold here: not step time
            t_free += time.perf_counter() - t_hook
        prof.close()
        return self._finish(stopped)

    def _notice(self) -> dict:
        """The drain notice behind an agreed preemption stop. Each rank polls for it on
        its own, so when another rank's poll saw it first this rank has none yet: read
        it now (it was posted before any rank could see it)."""
        if STOP.notice is None:
            STOP.notice = self.hooks.drain_notice()
        return STOP.notice or {}

    def _deadline_left(self) -> dict:
        deadline = self._notice().get("deadline")
        return {"deadline_left_s": round(deadline - time.time(), 2)} if deadline else {}

    def _announce_stop(self, stopped: str, step: int) -> None:
        if stopped != "preemption":
            log(self.rank, f"run.time_limit_s ({self.cfg.run.time_limit_s:.0f} s) reached: checkpointing step "
                           f"{step}, then the run ends (the same run name resumes it)" if stopped == "time_limit"
                else f"stop requested ({stopped}): checkpointing step {step}")
            self.writer.event("stop", step=step, reason=stopped)
            return
        n = self._notice()
        left = self._deadline_left()
        log(self.rank, f"preemption notice: node(s) {', '.join(x[:8] for x in n.get('nodes', []))} draining"
                       + (f", {left['deadline_left_s']:.0f} s to the deadline" if left else "")
                       + f": checkpointing step {step}, then moving off them")
        self.writer.event("preemption", step=step, nodes=n.get("nodes"), ranks=n.get("ranks"), **left)

    def _finish(self, stopped: str | None) -> dict:
        from raygpt.train.metrics import plot_loss, write_json_atomic

        self.ckpt.close()
        summary = {
            "best_val_loss": self.best_val if self.best_val < float("inf") else None,
            "final_val_loss": self.last_val,
            "steps": self.step,
            "tokens_per_s": self.last_rec.get("tokens_per_s"),
            "mfu": self.last_rec.get("mfu"),
            "train_seconds": round(self.train_seconds_prev + self.train_time, 3),
            "checkpoint": None,  # filled in by the driver (it knows the storage path)
            "world_size": self.devices,
            "plan": self.plan_desc,
            "params": self.n_params,
            "peak_mem_mb": self.last_rec.get("peak_mem_mb"),
        }
        if stopped:
            summary["stopped"] = stopped
        if self.auto is not None:
            summary["checkpoint_interval"] = {"every": "auto", **self.auto.choice(time.time())}
        # An empty segment (restored at the end, or stopped before a step) keeps the
        # summary the previous segment wrote.
        if self.member is not None:
            self.member.close()
        leads = self.member.is_leader if self.member is not None else self.rank == 0
        if leads and self.run_dir is not None and self.step > self.start_step:
            try:
                write_json_atomic(Path(self.run_dir) / "summary.json", summary)
            except OSError as e:  # storage that refuses writes: the run still ends well
                from raygpt.errors import describe_os_error

                log(self.rank, f"warning: summary.json not written ({describe_os_error(e)})")
            try:
                plot_loss(self.run_dir)
            except Exception as e:  # a plot must never fail a finished run
                log(self.rank, f"loss plot skipped: {e}")
        self.writer.event("end", step=self.step, **({"stopped": stopped} if stopped else {}))
        self.writer.close()
        return summary
