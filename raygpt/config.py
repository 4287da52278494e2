"""Typed, validated configuration.

One `Config` holds every section. Precedence (later wins): preset -> YAML file ->
`--set section.field=value` overrides -> explicit CLI flags. Every validation error is
turned into a one-line `ConfigError` naming the field path and the bad value.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


from raygpt.errors import UserError


class ConfigError(UserError, ValueError):
    """A user mistake in configuration: printed as one line, exit code 2."""


class _Section(BaseModel):
    # Unknown keys are errors (we suggest the closest name ourselves).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ParallelConfig(_Section):
    strategy: Literal["auto", "none", "ddp", "fsdp", "hsdp", "tp"] = "auto"
    # fsdp: shard group size (0 = all data-parallel ranks); hsdp: ranks per shard group.
    shard_degree: int = Field(0, ge=0)
    tp_degree: int = Field(1, ge=1)
    activation_checkpointing: bool = False
    compile: bool = False
    # Pipeline parallelism: stages of consecutive blocks (embeddings with the first,
    # head and loss with the last); combinable with fsdp/hsdp and tp.
    pp_degree: int = Field(1, ge=1)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"


class CheckpointConfig(_Section):
    every: int = Field(500, ge=0)  # 0 = only at the end
    keep: int = Field(2, ge=1)
    async_save: bool = True  # dcp.async_save on GPU; CPU always saves synchronously


class RunConfig(_Section):
    """Where and how the Ray Train job runs (driver-side settings)."""

    address: str | None = None  # None: local embedded Ray (or RAY_ADDRESS); "auto": join
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
    max_failures: int = Field(0, ge=-1)  # -1 = unlimited
    elastic_resize_interval_s: float = Field(60.0, gt=0)
    # Seconds to wait for workers to be placed before giving up with a clear error.
    placement_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _elastic(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"run.min_workers={self.min_workers} is larger than run.num_workers={self.num_workers}"
            )
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
        if self.model.n_head % self.parallel.tp_degree:
            raise ValueError(
                f"model.n_head={self.model.n_head} is not divisible by "
                f"parallel.tp_degree={self.parallel.tp_degree}"
            )
        return self

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


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r}{where}: invalid YAML") from None
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
    from raygpt.model.presets import get_preset

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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, p)
