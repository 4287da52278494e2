"""Typed, validated configuration.

One `Config` holds every section. Precedence (later wins): preset -> YAML file ->
`--set section.field=value` overrides -> explicit CLI flags. Every validation error is
turned into a one-line `ConfigError` naming the field path and the bad value.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


from raygpt.errors import ConfigError, UserError  # noqa: F401  (ConfigError: imported from here too)
from raygpt.errors import suggest as _suggest


class _Section(BaseModel):
    # Unknown keys are errors (we suggest the closest name ourselves).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_profile_spec(spec: str) -> tuple[int, int]:
    """train.profile / --profile "START:COUNT" -> (start, count); ValueError if malformed."""
    parts = spec.split(":")
    try:
        start, count = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = count = None
    if start is None or start < 0 or count < 1:
        raise ValueError(f"train.profile={spec!r}: expected START:COUNT with START >= 0 and COUNT >= 1, e.g. 10:5")
    return start, count


class ModelConfig(_Section):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=1)
    block_size: int = Field(64, ge=1)
    # None: taken from the prepared data's meta.json (padded, see pad_vocab_to).
    vocab_size: int | None = Field(None, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    # Pad the embedding table to a multiple of this (GPU matmul efficiency); 1 = off.
    pad_vocab_to: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}"
            )
        return self


class DataConfig(_Section):
    # Directory or storage URI (s3://, gs://, file://) with train/val Arrow shards +
    # meta.json (written by `raygpt prepare`); workers read a URI through the node-local
    # cache ($RAYGPT_CACHE_DIR). None: data.corpus (default the bundled Shakespeare),
    # prepared on first use into the cache dir.
    path: str | None = None
    # char | bpe | the path of a Hugging Face tokenizer.json (used unchanged).
    tokenizer: str = "char"
    # File, directory, glob or URI of .txt/.jsonl/.parquet(/.gz); None = tinyshakespeare.
    corpus: str | None = None
    text_field: str = "text"  # the jsonl field / parquet column holding the text
    bpe_vocab_size: int = Field(2048, ge=260)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # random: windows drawn with replacement; epoch: a seeded permutation of
    # non-overlapping windows, epoch after epoch (both indexed by step).
    sampling: Literal["random", "epoch"] = "random"

    @model_validator(mode="after")
    def _tokenizer(self):
        v = self.tokenizer
        if not (v in ("char", "bpe") or v.endswith(".json") or "/" in v):
            raise ValueError(f"data.tokenizer={v!r}: use char, bpe or the path of a tokenizer.json")
        return self


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    # Steps over which the cosine decays to min_lr; None = train.max_steps.
    decay_steps: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = off

    @model_validator(mode="after")
    def _min_lr(self):
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} is larger than optim.lr={self.lr}")
        return self


class TrainConfig(_Section):
    max_steps: int = Field(2000, ge=1)
    # Sequences per optimizer step, independent of the world size.
    global_batch: int = Field(12, ge=1)
    # Upper bound on sequences per forward pass per data-parallel rank; the worker
    # uses the largest divisor of (global_batch / dp) that is <= micro_batch.
    micro_batch: int = Field(12, ge=1)
    eval_every: int = Field(250, ge=1)
    eval_steps: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    # Pipeline microbatches per optimizer step and data-parallel rank; 0 = auto
    # (2 x pp_degree, or the largest divisor of the per-rank batch below it).
    pp_microbatches: int = Field(0, ge=0)
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    # Fine-tuning: exported model dir whose weights, config and tokenizer are the start.
    init_from: str | None = None
    # Parameters kept frozen: "embeddings" and/or "blocks:N" (the first N blocks).
    freeze: list[str] = Field(default_factory=list)
    # "START:COUNT": a torch profiler trace of steps START..START+COUNT-1 per rank in the
    # run dir (profile/), plus a CUDA memory snapshot on GPU. None = off.
    profile: str | None = None

    @field_validator("profile", mode="before")
    @classmethod
    def _profile_spec(cls, v):
        if v is None:
            return v
        if not isinstance(v, str):  # YAML reads an unquoted 5:3 as the base-60 integer 303
            raise ValueError(f"train.profile={v!r}: expected a quoted string \"START:COUNT\", e.g. \"10:5\"")
        parse_profile_spec(v)
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze_specs(cls, v: list[str]) -> list[str]:
        # Checked here (and against model.n_layer in Config) so that a typo stops before
        # Ray starts, not inside a worker.
        for item in v:
            if item == "embeddings":
                continue
            head, _, n = item.partition(":")
            if head != "blocks" or not n.strip().isdigit() or int(n) < 1:
                hint = "" if head == "blocks" else _suggest(item, ["embeddings"])
                raise ValueError(f"train.freeze entry {item!r}: expected 'embeddings' or 'blocks:N' "
                                 f"(N >= 1){hint}")
        return v


class ParallelConfig(_Section):
    strategy: Literal["auto", "none", "ddp", "fsdp", "hsdp", "tp"] = "auto"
    # fsdp: shard group size (0 = all data-parallel ranks); hsdp: ranks per shard group.
    shard_degree: int = Field(0, ge=0)
    tp_degree: int = Field(1, ge=1)
    activation_checkpointing: bool = False
    compile: bool = False
    # What parallel.compile compiles: "model" (the whole model with its loss, one graph),
    # "blocks" (each block, plus the head with its loss), "auto" (model on one rank,
    # blocks with several: gradient communication then overlaps backward).
    compile_mode: Literal["auto", "model", "blocks"] = "auto"
    # torch.compile's own mode: "max-autotune-no-cudagraphs" benchmarks GEMM and Triton
    # configurations at compile time (minutes longer to start, faster steps on GPU).
    inductor_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    # With compile: keep torch.compile's cache artifacts in <run_dir>/compile_cache/ and
    # load them before a restart compiles (raygpt.parallel.compile_cache), so a worker
    # restarted on this node or another that sees the run directory compiles warm.
    compile_cache: bool = True
    # Which attention kernel scaled_dot_product_attention tries first (the others stay as
    # fallbacks for shapes it cannot take). "auto": torch's order (flash first);
    # "cudnn": cuDNN's fused attention, the faster one on Hopper GPUs.
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # q/k/v projections as one matmul in training (off under tensor parallelism, which
    # shards them; KV-cached decoding always runs them apart).
    fuse_qkv: bool = True
    # Pipeline parallelism: stages of consecutive blocks (embeddings with the first,
    # head and loss with the last); combinable with fsdp/hsdp and tp.
    pp_degree: int = Field(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"


class CheckpointConfig(_Section):
    # Steps between saves (0 = only at the end), or "auto": Young's interval
    # sqrt(2 x save cost x MTBF) from the measured save cost and run.mtbf_s (or the
    # failure rate the run has seen), re-estimated as measurements arrive
    # (raygpt.train.ckpt_interval); the choice is logged and in summary.json.
    every: Union[int, Literal["auto"]] = 500
    keep: int = Field(2, ge=1)
    async_save: bool = True  # dcp.async_save on GPU; CPU always saves synchronously
    # Where an async save is written: "thread" (a thread of the training process; its
    # serialization holds the GIL the training loop needs to launch kernels) or "process"
    # (one checkpoint process per rank, started at the first save; staging buffers then
    # live in shared memory, so a save hands it handles, not copies).
    async_mode: Literal["thread", "process"] = "thread"
    # The run's final checkpoint, when the storage refuses it, is tried again with
    # backoff for this long before the run gives up on it (a storage hiccup passes).
    final_retry_s: float = Field(60.0, ge=0)

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        raise ValueError(f"checkpoint.every={v!r}: neither a step count (0 or more) nor 'auto'")


class RunConfig(_Section):
    """Where and how the Ray Train job runs (driver-side settings)."""

    address: str | None = None  # None: local embedded Ray (or RAY_ADDRESS); "auto": join
    # Start the embedded Ray's dashboard (http://127.0.0.1:8265). Off by default: it
    # costs ~4 s of start-up (ray.init waits for it) and background CPU beside training.
    dashboard: bool = False
    num_workers: int = Field(1, ge=1)
    # Elastic: min workers; None = fixed size num_workers.
    min_workers: int | None = Field(None, ge=1)
    use_gpu: bool | None = None  # None: auto-detect
    # None: on the embedded local Ray, this machine's CPUs split among the workers; 1 on a cluster.
    cpus_per_worker: float | None = Field(None, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    storage: str | None = None  # local path or pyarrow URI; None: ./runs
    name: str | None = None  # None: generated
    # Worker-group restarts from the latest checkpoint before the run fails (-1 =
    # unlimited). A run survives failures by default; the same failure at the same step
    # twice (a bug, a bad batch) stops it at once instead of looping.
    max_failures: int = Field(5, ge=-1)
    elastic_resize_interval_s: float = Field(60.0, gt=0)
    # How long a collective (all-reduce, checkpoint gather) may hang before the worker
    # group fails and restarts from a checkpoint (torch's default is 30 min). The hang
    # watchdog below acts long before; this is the backstop.
    collective_timeout_s: float = Field(600.0, gt=0)
    # Hang watchdog (raygpt.train.watchdog), two-phase like torchtitan's timeouts: after
    # the first step, no rank making progress for hang_timeout_s is a hang (None: auto,
    # max(15 s, 20 x the slowest step seen)); before it, and during evals and checkpoint
    # saves, init_timeout_s. The stuck ranks are named, every rank's stacks saved, and
    # the group restarts from the latest checkpoint. hang_timeout_s=0 turns it off.
    hang_timeout_s: float | None = Field(None, ge=0)
    init_timeout_s: float = Field(600.0, gt=0)
    # Stragglers: a rank whose own work (data + compute, before it waits on the others)
    # takes straggler_factor x the others' median (the median of its last straggler_steps steps).
    straggler_factor: float = Field(1.5, gt=1)
    straggler_steps: int = Field(5, ge=1)
    # What a flagged straggler does: "warn" (an event and the progress line), or "drain"
    # (elastic runs: its node is drained through Ray, the group checkpoints and goes on
    # without it, as on a preemption notice; it may come back as a fresh node).
    straggler_policy: Literal["warn", "drain"] = "warn"
    # Mean time between failures of this run's cluster, for checkpoint.every=auto
    # (None: the failure rate the run itself has seen; an hour before its first failure).
    mtbf_s: float | None = Field(None, gt=0)
    # Wall seconds from a launch's start after which the run checkpoints and ends, as on
    # Ctrl-C (a reservation's end); the same run name resumes it. None: no limit.
    time_limit_s: float | None = Field(None, gt=0)
    # Seconds to wait for workers to be placed before giving up with a clear error.
    placement_timeout_s: float = Field(120.0, gt=0)
    # What a lost worker costs: "restart" (the whole group restarts from the latest
    # checkpoint) or "replica" (data-parallel runs: each worker is a replica in a torchft
    # quorum; the others go on at the next step and a replacement heals from a live peer;
    # raygpt.parallel.replica, docs/replica_recovery.md).
    fault_tolerance: Literal["restart", "replica"] = "restart"

    @model_validator(mode="after")
    def _elastic(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"run.min_workers={self.min_workers} is larger than run.num_workers={self.num_workers}"
            )
        if self.straggler_policy == "drain" and (self.min_workers is None or self.min_workers >= self.num_workers):
            raise ValueError("run.straggler_policy=drain needs an elastic run (run.min_workers below "
                             "run.num_workers, e.g. -n 1:2): a fixed-size group cannot go on without the node")
        return self


class DistillConfig(_Section):
    """Knowledge distillation: train on a teacher's soft targets (raygpt distill)."""

    teacher: str | None = None  # exported model dir; None = no distillation
    temperature: float = Field(2.0, gt=0)
    # Weight of the KL term; (1 - alpha) goes to the usual cross-entropy on the data.
    alpha: float = Field(0.5, ge=0.0, le=1.0)


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    preset: str | None = None  # informational: which preset this started from

    @model_validator(mode="after")
    def _cross(self):
        if self.train.micro_batch > self.train.global_batch:
            # Clamp silently would hide a typo; a larger micro batch can never be used.
            raise ValueError(
                f"train.micro_batch={self.train.micro_batch} is larger than "
                f"train.global_batch={self.train.global_batch}"
            )
        pp = self.parallel.pp_degree
        stages = pp * (2 if self.parallel.pp_schedule == "interleaved" and pp > 1 else 1)
        if stages > self.model.n_layer:
            raise ValueError(
                f"parallel.pp_degree={pp} ({stages} stages with pp_schedule="
                f"{self.parallel.pp_schedule}) is larger than model.n_layer={self.model.n_layer}: "
                f"every stage needs at least one block"
            )
        for item in self.train.freeze:
            if item.startswith("blocks:") and int(item.split(":", 1)[1]) > self.model.n_layer:
                raise ValueError(f"train.freeze entry {item!r}: the model has "
                                 f"model.n_layer={self.model.n_layer} blocks")
        if self.run.fault_tolerance == "replica":
            self._replica_only_dp()
        if self.model.n_head % self.parallel.tp_degree:
            raise ValueError(
                f"model.n_head={self.model.n_head} is not divisible by "
                f"parallel.tp_degree={self.parallel.tp_degree}"
            )
        return self

    def _replica_only_dp(self) -> None:
        """run.fault_tolerance=replica: one worker per replica, so data parallelism only."""
        p, r = self.parallel, self.run
        why = (f"parallel.strategy={p.strategy}" if p.strategy not in ("auto", "none", "ddp") else
               f"parallel.tp_degree={p.tp_degree}" if p.tp_degree > 1 else
               f"parallel.pp_degree={p.pp_degree}" if p.pp_degree > 1 else
               f"run.min_workers={r.min_workers} (elastic resizing)"
               if r.min_workers is not None and r.min_workers < r.num_workers else
               "distill.teacher" if self.distill.teacher else None)
        if why:
            raise ValueError(f"run.fault_tolerance=replica works with data-parallel runs only (one worker "
                             f"per replica, DDP): {why} is not supported in this mode; use "
                             "run.fault_tolerance=restart")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
    "run": RunConfig,
    "distill": DistillConfig,
}


# ---------------------------------------------------------------- errors


def _format_validation_error(err: ValidationError, data: dict | None = None) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    path = ".".join(loc)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        # Unknown key: suggest the closest field of that section.
        if len(loc) == 1:
            choices = list(SECTIONS) + ["preset"]
        else:
            section = SECTIONS.get(loc[0])
            choices = list(section.model_fields) if section else []
        return f"unknown config key '{path}'{_suggest(loc[-1], choices)}"
    if msg.startswith("Value error, "):
        # Our own validators already name the fields and values.
        return msg[len("Value error, "):]
    value = first.get("input")
    if isinstance(value, dict):
        return f"{path or 'config'}: {msg}"
    return f"{path}={value!r}: {msg}" if path else msg


def validate(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, data)) from None


def check_paths(cfg: Config) -> None:
    """The local paths a config names exist where the driver runs (it reads them there):
    called before Ray starts, so that a typo is one line, not a failure after start-up.
    URIs are left to the code that reads them."""
    checks = [("train.init_from", cfg.train.init_from, "config.json"),
              ("distill.teacher", cfg.distill.teacher, "config.json")]
    if cfg.data.path:
        checks.append(("data.path", cfg.data.path, "meta.json"))
    elif cfg.data.corpus:
        checks.append(("data.corpus", cfg.data.corpus, None))
    for key, value, need in checks:
        if not value or "://" in value:
            continue
        p = Path(value).expanduser()
        if not p.exists():
            raise ConfigError(f"{key}={value!r}: no such file or directory")
        if need and not (p / need).is_file():
            hint = f"run `raygpt prepare --out {value}`" if need == "meta.json" else "export it with `raygpt export`"
            raise ConfigError(f"{key}={value!r} has no {need}: {hint}")


# ---------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.field=value` -> (["section", "field"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: expected section.field=value (e.g. optim.lr=3e-4)")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config section '{parts[0]}'{_suggest(parts[0], SECTIONS)}")
    section = SECTIONS[parts[0]]
    if parts[1] not in section.model_fields:
        raise ConfigError(
            f"unknown config key '{parts[0]}.{parts[1]}'{_suggest(parts[1], section.model_fields)}"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = dict(data)
    for item in overrides or []:
        parts, value = parse_override(item)
        cur = data
        for p in parts[:-1]:
            cur[p] = dict(cur.get(p) or {})
            cur = cur[p]
        cur[parts[-1]] = value
    return data


def load_yaml_file(path: str | os.PathLike, error: type[ConfigError] = ConfigError,
                   missing: str = "config file", invalid: str = "config file") -> Any:
    """The YAML document in the file at `path` (None when it is empty). Raises `error`
    "<missing> 'PATH' does not exist" or "<invalid> 'PATH' line N: invalid YAML"."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{missing} {str(p)!r} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{invalid} {str(p)!r}{where}: invalid YAML") from None


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    data = load_yaml_file(p)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections at the top")
    return data


def load_config(
    preset: str | None = None,
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    extra: dict | None = None,
) -> Config:
    """preset -> YAML file -> --set overrides -> `extra` (explicit CLI flags)."""
    from raygpt.presets import get_preset

    data: dict = {}
    file_data = read_yaml(path) if path else {}
    name = preset or file_data.get("preset")
    if name:
        data = _deep_merge(get_preset(name), {"preset": name})
    data = _deep_merge(data, file_data)
    data = apply_overrides(data, overrides)
    if extra:
        data = _deep_merge(data, extra)
    return validate(data)


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write YAML atomically (temp name, then rename)."""
    from raygpt.files import write_atomic

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, cfg.to_yaml())
