"""The run config of `raygpt distill`: a student preset trained on a teacher's soft targets.

The student must speak the teacher's language: it gets the teacher's vocabulary size
(its logits line up with the teacher's) and trains on data encoded with the teacher's
tokenizer: by default the data the teacher was trained on (config.json's
raygpt_config.data), else the given data.path (checked) or data.corpus (encoded with the
teacher's tokenizer). Its context cannot exceed the teacher's.
"""
from __future__ import annotations

from pathlib import Path

from raygpt.config import ConfigError, validate
from raygpt.errors import UserError



def _set_keys(sets: list[str]) -> set[str]:
    return {s.split("=", 1)[0].strip() for s in sets}


def build_distill_config(teacher: str, config: str | None, preset: str | None,
                         sets: list[str] | None, *, temperature: float | None = None,
                         alpha: float | None = None, log=None, **run_kw):
    """-> a validated Config with distill.teacher set. run_kw: build_run_config's flags."""
    from raygpt.lifecycle.data import check_same_tokenizer, data_for_model, resolve_data_arg
    from raygpt.model.io import TOKENIZER, read_model_config
    from raygpt.train.runconfig import build_run_config

    log = log or (lambda _m: None)
    tdir = Path(teacher).expanduser().resolve()
    tmeta = read_model_config(tdir)
    if not (tdir / TOKENIZER).is_file():
        raise UserError(f"--teacher {teacher}: the model directory has no {TOKENIZER}")
    sets = list(sets or [])
    keys = _set_keys(sets)
    for k in keys:
        if k in ("model.vocab_size", "model.pad_vocab_to"):
            raise ConfigError(f"--set {k}: the student takes the teacher's vocabulary "
                              f"({tmeta['model']['vocab_size']})")
        if k == "distill.teacher" or k == "train.init_from":
            raise ConfigError(f"--set {k}: use --teacher (and `raygpt train --init-from` to fine-tune)")
    cfg = build_run_config(config, preset, sets, **run_kw)
    d = cfg.to_dict()
    tshape = tmeta["model"]
    d["model"]["vocab_size"] = tshape["vocab_size"]
    d["model"]["pad_vocab_to"] = 1
    if d["model"]["block_size"] > tshape["block_size"]:
        if "model.block_size" in keys:
            raise ConfigError(f"--set model.block_size={d['model']['block_size']}: larger than the "
                              f"teacher's context ({tshape['block_size']})")
        log(f"student block_size {d['model']['block_size']} -> {tshape['block_size']} (the teacher's context)")
        d["model"]["block_size"] = tshape["block_size"]
    d["distill"]["teacher"] = str(tdir)
    if temperature is not None:
        d["distill"]["temperature"] = temperature
    if alpha is not None:
        d["distill"]["alpha"] = alpha

    data = d["data"]
    user_data = any(k.startswith("data.") for k in keys) or bool(config and (data.get("path") or data.get("corpus")))
    if data.get("path"):
        check_same_tokenizer(tdir, data["path"], what="teacher")
    elif user_data and data.get("corpus"):
        data["path"] = str(resolve_data_arg(data["corpus"], tdir, log))
    else:
        data["path"] = str(data_for_model(tdir, None, log))
    return validate(d)
