"""Search spaces: a YAML file mapping config fields to distributions.

    optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    train.micro_batch: {choice: [2, 4]}
    parallel.strategy: {grid: [ddp, fsdp]}
    run.num_workers: {randint: [1, 4]}       # inclusive bounds
    parallel.activation_checkpointing: {choice: [false, true]}
    optim.weight_decay: 0.05                 # a plain value: fixed for every trial

Sections may also nest (``optim: {lr: {loguniform: [...]}}``). Everything is checked
here, before Ray starts: unknown fields (with a suggestion), unknown distributions,
empty lists, bounds in the wrong order, values the field cannot take (``lr <= 0``).
Checks that depend on other fields (micro batch vs global batch, a parallel plan vs
the worker count) happen per trial: such a trial is recorded as infeasible.

No Ray import at module level (used by the CLI before Ray starts and by unit tests).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygpt.config import SECTIONS, Config, ConfigError, load_yaml_file, parse_override, validate
from raygpt.errors import suggest as _suggest

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")
DISCRETE = ("choice", "grid")
# Fields a sweep owns (every trial gets its own run directory and the sweep's cluster).
NOT_SWEEPABLE = {"run.storage", "run.name", "run.address", "data.path", "data.corpus",
                 "data.tokenizer", "preset"}


class SpaceError(ConfigError):
    """A mistake in a search space: one line, exit code 2."""


@dataclass(frozen=True)
class Param:
    key: str  # "section.field"
    kind: str  # one of DISTRIBUTIONS, or "const"
    args: tuple  # bounds (2 numbers) or values

    def values(self) -> list:
        """Every value a discrete parameter can take (bounds for continuous ones)."""
        if self.kind == "const":
            return [self.args[0]]
        if self.kind == "randint":
            return list(range(int(self.args[0]), int(self.args[1]) + 1))
        return list(self.args)

    def describe(self) -> str:
        if self.kind == "const":
            return f"{self.key} = {self.args[0]!r}"
        if self.kind in DISCRETE:
            return f"{self.key} ~ {self.kind}{list(self.args)}"
        return f"{self.key} ~ {self.kind}[{self.args[0]}, {self.args[1]}]"


@dataclass
class Space:
    params: list[Param] = field(default_factory=list)
    source: str = "<default>"

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def get(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    @property
    def swept(self) -> list[Param]:
        return [p for p in self.params if p.kind != "const"]

    @property
    def constants(self) -> dict[str, Any]:
        return {p.key: p.args[0] for p in self.params if p.kind == "const"}

    @property
    def is_discrete(self) -> bool:
        return all(p.kind in DISCRETE + ("const", "randint") for p in self.params)

    def grid_size(self) -> int:
        n = 1
        for p in self.params:
            if p.kind == "grid":
                n *= len(p.args)
        return n

    def to_dict(self) -> dict:
        out = {}
        for p in self.params:
            out[p.key] = p.args[0] if p.kind == "const" else {p.kind: list(p.args)}
        return out

    def to_tune(self) -> dict:
        """Tune param_space: flat keys "section.field" -> Tune domains."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.params:
            a = p.args
            if p.kind == "const":
                out[p.key] = a[0]
            elif p.kind == "loguniform":
                out[p.key] = tune.loguniform(float(a[0]), float(a[1]))
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(float(a[0]), float(a[1]))
            elif p.kind == "randint":
                out[p.key] = tune.randint(int(a[0]), int(a[1]) + 1)  # Tune's upper is exclusive
            elif p.kind == "choice":
                out[p.key] = tune.choice(list(a))
            elif p.kind == "grid":
                out[p.key] = tune.grid_search(list(a))
        return out

    def combinations(self) -> list[dict[str, Any]]:
        """Every combination of a discrete space (grid, choice and randint all enumerated)."""
        combos: list[dict[str, Any]] = [{}]
        for p in self.params:
            combos = [{**c, p.key: v} for c in combos for v in p.values()]
        return combos


# ---------------------------------------------------------------- parsing


def _err(source: str, msg: str) -> SpaceError:
    return SpaceError(f"search space {source}: {msg}")


def _flatten(data: dict, source: str) -> dict[str, Any]:
    """Accept "section.field: dist" and "section: {field: dist}"."""
    flat: dict[str, Any] = {}
    for key, val in data.items():
        if not isinstance(key, str):
            raise _err(source, f"key {key!r} is not a config field name")
        if "." not in key and key in SECTIONS and isinstance(val, dict) and not _is_dist(val):
            for sub, v in val.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = val
    return flat


def _is_dist(val: Any) -> bool:
    return isinstance(val, dict) and len(val) == 1 and next(iter(val)) in DISTRIBUTIONS


def _field_info(key: str):
    section, name = key.split(".", 1)
    return SECTIONS[section].model_fields[name]


def _check_field_value(key: str, value: Any, source: str, what: str = "") -> Any:
    """Validate one value against the field's own type and bounds; returns the coerced value."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    info = _field_info(key)
    typ = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    try:
        return TypeAdapter(typ).validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        raise _err(source, f"{key}{what}={value!r}: {first['msg']}") from None


def _check_key(key: str, source: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        if key in SECTIONS:
            raise _err(source, f"'{key}' is a section: name a field, e.g. {key}."
                               f"{next(iter(SECTIONS[key].model_fields))}")
        raise _err(source, f"key '{key}': expected section.field (e.g. optim.lr)")
    try:
        parse_override(f"{key}=0")
    except ConfigError as e:
        raise _err(source, str(e)) from None
    if key in NOT_SWEEPABLE:
        raise _err(source, f"{key} is set by the sweep itself and cannot be searched")


def _num(key: str, kind: str, v: Any, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(source, f"{key}: {kind} bounds must be numbers, got {v!r}")
    if not math.isfinite(v):
        raise _err(source, f"{key}: {kind} bounds must be finite, got {v!r}")
    return v


def parse_param(key: str, spec: Any, source: str = "<space>") -> Param:
    _check_key(key, source)
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise _err(source, f"{key}: a list needs a distribution: {{choice: {spec}}} "
                               f"or {{grid: {spec}}}")
        return Param(key, "const", (_check_field_value(key, spec, source),))
    if len(spec) != 1:
        raise _err(source, f"{key}: expected one distribution ({', '.join(DISTRIBUTIONS)}), "
                           f"got {sorted(map(str, spec))}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise _err(source, f"{key}: unknown distribution '{kind}'{_suggest(str(kind), DISTRIBUTIONS)}; "
                           f"known: {', '.join(DISTRIBUTIONS)}")
    if kind in DISCRETE:
        if not isinstance(args, list):
            raise _err(source, f"{key}: {kind} takes a list of values, got {args!r}")
        if not args:
            raise _err(source, f"{key}: {kind} list is empty")
        values = [_check_field_value(key, v, source) for v in args]
        if len(set(map(repr, values))) != len(values):
            raise _err(source, f"{key}: {kind} list has duplicates: {args}")
        return Param(key, kind, tuple(values))
    # continuous / integer ranges: [low, high]
    if not isinstance(args, list) or len(args) != 2:
        raise _err(source, f"{key}: {kind} takes [low, high], got {args!r}")
    lo, hi = (_num(key, kind, v, source) for v in args)
    if kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise _err(source, f"{key}: randint bounds must be integers, got {args}")
        lo, hi = int(lo), int(hi)
        if lo > hi:
            raise _err(source, f"{key}: randint low {lo} is larger than high {hi}")
    elif lo >= hi:
        raise _err(source, f"{key}: {kind} low {lo} must be smaller than high {hi}")
    if kind == "loguniform" and lo <= 0:
        raise _err(source, f"{key}: loguniform bounds must be > 0, got [{lo}, {hi}]")
    ann = _field_info(key).annotation
    if kind in ("loguniform", "uniform") and ann not in (float, float | None):
        raise _err(source, f"{key} takes {getattr(ann, '__name__', ann)} values: use choice, grid or randint")
    _check_field_value(key, lo, source, " (low bound)")
    _check_field_value(key, hi, source, " (high bound)")
    return Param(key, kind, (lo, hi))


def parse_space(data: Any, source: str = "<space>") -> Space:
    if data is None or data == {}:
        raise _err(source, "is empty: map config fields to distributions, e.g. "
                           "optim.lr: {loguniform: [1.0e-4, 3.0e-3]}")
    if not isinstance(data, dict):
        raise _err(source, "expected a mapping of config fields to distributions")
    params = [parse_param(k, v, source) for k, v in _flatten(data, source).items()]
    if not any(p.kind != "const" for p in params):
        raise _err(source, "has no distribution: nothing to search")
    return Space(params, source)


def load_space(path: str | os.PathLike) -> Space:
    p = Path(path)
    data = load_yaml_file(p, SpaceError, missing="search space file", invalid="search space")
    return parse_space(data, repr(str(p)))


# ---------------------------------------------------------------- configs


def apply_params(base: dict, values: dict[str, Any]) -> dict:
    """Config dict with the flat "section.field" values set. When the learning rate is
    searched and min_lr is not, min_lr keeps the base config's ratio to lr."""
    import copy

    d = copy.deepcopy(base)
    for key, v in values.items():
        section, name = key.split(".", 1)
        d.setdefault(section, {})[name] = v
    if "optim.lr" in values and "optim.min_lr" not in values:
        b = base.get("optim", {})
        lr0, min0 = b.get("lr", 1e-3), b.get("min_lr", 1e-4)
        ratio = (min0 / lr0) if lr0 else 0.1
        d["optim"]["min_lr"] = float(values["optim.lr"]) * ratio
    return d


def trial_config(base: dict, values: dict[str, Any]) -> Config:
    """The validated config of one trial (ConfigError when the combination is invalid)."""
    return validate(apply_params(base, values))


def check_constants(base: dict, space: Space) -> None:
    """The fixed values must make a valid config on their own."""
    if space.constants:
        try:
            trial_config(base, space.constants)
        except ConfigError as e:
            raise SpaceError(f"search space {space.source}: {e}") from None


# ---------------------------------------------------------------- defaults


def default_space(mode: str, cfg: Config, max_workers: int = 1) -> Space:
    """The space used when --space is not given."""
    if mode == "quality":
        lr = cfg.optim.lr
        data = {
            "optim.lr": {"loguniform": [float(f"{lr / 10:.3g}"), float(f"{lr * 3:.3g}")]},
            "optim.weight_decay": {"choice": [0.0, 0.1]},
        }
        if max_workers >= 2:
            data["run.num_workers"] = {"choice": [1, 2]}
        return parse_space(data, "<default quality space>")
    if mode == "throughput":
        workers = [w for w in (1, 2, 4, 8) if w <= max(1, max_workers)]
        gb, mb = cfg.train.global_batch, cfg.train.micro_batch
        micro = sorted({m for m in (mb, mb // 2, mb * 2) if 1 <= m <= gb and gb % m == 0})
        data: dict[str, Any] = {"train.micro_batch": {"grid": micro or [mb]}}
        if len(workers) > 1:
            data["run.num_workers"] = {"grid": workers}
            data["parallel.strategy"] = {"grid": ["ddp", "fsdp"]}
        if len(workers) > 1 and cfg.model.n_layer >= 2:
            # Pipeline stages as well (pp x fsdp); pp with ddp is recorded as infeasible.
            data["parallel.pp_degree"] = {"grid": [1, 2]}
        data["parallel.activation_checkpointing"] = {"grid": [False, True]}
        return parse_space(data, "<default throughput space>")
    raise SpaceError(f"--mode {mode!r}: expected quality or throughput")
