"""The run's Config from what a command line gives (preset, --config file, --set
overrides, explicit flags): shared by `raygpt train`, `tune`, `chaos` and `distill`,
and importable without the CLI."""
from __future__ import annotations

import json

from raygpt.errors import UserError


def parse_workers(spec: str) -> tuple[int, int | None]:
    """'4' -> (4, None); '1:4' -> (4, 1) (max, min) for an elastic run."""
    try:
        if ":" in spec:
            lo, hi = (int(x) for x in spec.split(":", 1))
            if lo < 1 or hi < lo:
                raise ValueError
            return hi, lo
        n = int(spec)
        if n < 1:
            raise ValueError
        return n, None
    except ValueError:
        raise UserError(f"--num-workers {spec!r}: expected N or MIN:MAX with 1 <= MIN <= MAX") from None


def build_run_config(config, preset, sets, *, num_workers=None, use_gpu=None, cpus_per_worker=None,
                     gpus_per_worker=None, storage=None, name=None, address=None, max_failures=None,
                     dashboard=None, init_from=None, resources=None, profile=None):
    from raygpt.config import load_config
    from raygpt.presets import DEFAULT_PRESET

    run: dict = {}
    if num_workers is not None:
        n, lo = parse_workers(num_workers)
        run["num_workers"] = n
        run["min_workers"] = lo
    for key, val in (("use_gpu", use_gpu), ("cpus_per_worker", cpus_per_worker),
                     ("gpus_per_worker", gpus_per_worker), ("storage", storage), ("name", name),
                     ("address", address), ("max_failures", max_failures), ("dashboard", dashboard)):
        if val is not None:
            run[key] = val
    if resources:
        try:
            run["resources_per_worker"] = json.loads(resources)
        except json.JSONDecodeError:
            raise UserError(f"--resources-per-worker {resources!r}: expected JSON like '{{\"w\": 1}}'") from None
    extra = {"run": run} if run else {}
    if profile is not None:
        extra["train"] = {"profile": profile}
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    cfg = load_config(preset=preset, path=config, overrides=sets, extra=extra)
    if init_from:
        cfg = _apply_init_from(cfg, init_from, sets or [])
    return cfg


def _apply_init_from(cfg, init_from, sets):
    """Fine-tuning: the exported model's shape wins; shape overrides are refused."""
    from raygpt.config import ConfigError, validate
    from raygpt.model.io import read_model_config

    meta = read_model_config(init_from)
    shape = meta["model"]
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key.startswith("model.") and key.split(".", 1)[1] in ("n_layer", "n_head", "n_embd", "vocab_size", "bias"):
            raise ConfigError(f"--set {item!r}: --init-from {init_from} fixes the model shape; {key} cannot change")
    d = cfg.to_dict()
    d["model"].update({k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")})
    if d["model"]["block_size"] > shape["block_size"]:
        if any(i.split("=", 1)[0].strip() == "model.block_size" for i in sets):
            raise ConfigError(f"--set model.block_size={d['model']['block_size']}: larger than the context of "
                              f"--init-from {init_from} ({shape['block_size']} positions)")
        d["model"]["block_size"] = shape["block_size"]
    d["model"]["vocab_size"], d["model"]["pad_vocab_to"] = _vocab_and_padding(shape)
    d["train"]["init_from"] = str(init_from)
    return validate(d)


def _vocab_and_padding(shape: dict) -> tuple[int, int]:
    """(model.vocab_size, model.pad_vocab_to) that rebuild the source's embedding table
    and keep its padded ids (GPT-2: 50257 of 50304) out of the predictions."""
    v, real = shape["vocab_size"], shape.get("real_vocab_size")
    if not real or real >= v:
        return v, 1
    return real, (64 if -(-real // 64) * 64 == v else v)
