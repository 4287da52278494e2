"""Data for an existing model: text prepared with the model's own tokenizer, and the
default held-out data a model is evaluated on.

`raygpt prepare` trains a new tokenizer on its corpus; a fine-tuning or evaluation corpus
must instead be encoded with the tokenizer the model was trained with (a char model
trained on Shakespeare maps 'a' to id 39; a tokenizer trained on new text would not).
`prepare_with_tokenizer` is `raygpt prepare --tokenizer MODEL_DIR/tokenizer.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from raygpt.data.tokenizer import (_tokenizer_file, check_same_tokenizer, same_tokenizer,  # noqa: F401
                                   tokenizer_fingerprint)
from raygpt.errors import UserError

TOKENIZER = "tokenizer.json"
META = "meta.json"


# ----------------------------------------------------------------------------- prepare


def prepare_with_tokenizer(corpus: str | os.PathLike | None, out: str | os.PathLike,
                           tokenizer_path: str | os.PathLike, val_fraction: float = 0.1,
                           unknown: str = "error", shard_tokens: int = 50_000_000,
                           log: Callable[[str], None] | None = None) -> dict:
    """`raygpt prepare --tokenizer MODEL_DIR/tokenizer.json`: encode `corpus` with an
    existing tokenizer.json (one code path with prepare). unknown: what to do with
    characters a char tokenizer does not know: "error" (a UserError naming the character)
    or "drop" (removed; their count lands in meta.json). Byte-level BPE encodes any text."""
    from raygpt.data.prepare import prepare_corpus

    return prepare_corpus(corpus, out, tokenizer=str(_tokenizer_file(tokenizer_path)),
                          val_fraction=val_fraction, shard_tokens=shard_tokens,
                          unknown=unknown, log=log)


# ----------------------------------------------------------------------------- model data


def _is_prepared(p: Path) -> bool:
    return (p / META).is_file() and (p / TOKENIZER).is_file()


def _cached_encoding(corpus: str | None, model_dir: Path, val_fraction: float,
                     log: Callable[[str], None]) -> Path:
    """`corpus` encoded with the model's tokenizer, cached (re-encoded when it changed)."""
    from raygpt.data import prepare as prep

    c = prep.resolve_corpus(corpus)
    if corpus is None:
        name = prep.BUNDLED_NAME
    else:
        p = Path(corpus).expanduser().absolute()
        name = f"{p.stem or 'corpus'}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    fp = tokenizer_fingerprint(model_dir)
    suffix = "" if val_fraction == 0.1 else f"-val{val_fraction:g}"
    target = prep.cache_dir() / "data" / f"{name}-tok{fp[:12]}{suffix}"
    if _is_prepared(target):
        try:
            meta = json.loads((target / META).read_text())
        except ValueError:
            meta = {}
        if meta.get("corpus_stat") == prep._corpus_stat(c):
            return target
    prepare_with_tokenizer(corpus, target, model_dir / TOKENIZER, val_fraction=val_fraction,
                           unknown="drop", log=log)
    return target


def resolve_data_arg(data: str | os.PathLike, model_dir: str | os.PathLike,
                     log: Callable[[str], None] | None = None) -> Path:
    """--data: a prepared directory (its tokenizer must be the model's), or a text file /
    directory of text files (encoded with the model's tokenizer, cached)."""
    log = log or (lambda _m: None)
    p = Path(data).expanduser()
    if not p.exists():
        raise UserError(f"--data {data}: no such file or directory")
    if (p / META).is_file():
        check_same_tokenizer(model_dir, p)
        return p
    return _cached_encoding(str(p), Path(model_dir), 0.1, log)


def data_for_model(model_dir: str | os.PathLike, data: str | os.PathLike | None = None,
                   log: Callable[[str], None] | None = None) -> Path:
    """The held-out data to evaluate `model_dir` on.

    `data` given: see resolve_data_arg. Otherwise the data the model was trained on, as
    recorded in config.json (raygpt_config.data): its prepared directory when it still
    exists with the same tokenizer, else its corpus (None = the bundled one) encoded with
    the model's tokenizer. A model without that record: the bundled corpus."""
    from raygpt.data import prepare as prep
    from raygpt.model.io import read_model_config

    log = log or (lambda _m: None)
    model_dir = Path(model_dir).expanduser()
    meta = read_model_config(model_dir)
    if not (model_dir / TOKENIZER).is_file():
        raise UserError(f"model directory {model_dir} has no {TOKENIZER}")
    if data is not None:
        return resolve_data_arg(data, model_dir, log)
    dcfg = (meta.get("raygpt_config") or {}).get("data") or {}
    path = dcfg.get("path")
    if path and _is_prepared(Path(path).expanduser()) and same_tokenizer(model_dir, Path(path).expanduser()):
        return Path(path).expanduser()
    corpus = dcfg.get("corpus")
    vf = float(dcfg.get("val_fraction") or 0.1)
    if path and not corpus:
        # The prepared directory is gone or differs: its meta may name the corpus.
        try:
            label = json.loads((Path(path).expanduser() / META).read_text()).get("corpus")
            if label and not label.startswith("bundled:") and Path(label).exists():
                corpus = label
        except (OSError, ValueError):
            pass
    if corpus is not None and not Path(corpus).expanduser().exists():
        log(f"the model's training corpus {corpus} is not here: evaluating on the bundled corpus")
        corpus = None
    # The standard cache of `raygpt train` (same corpus, same tokenizer) when present.
    if dcfg:
        try:
            from raygpt.config import DataConfig

            dc = DataConfig(**{**dcfg, "path": None, "corpus": corpus})
            std = prep.cache_dir() / "data" / prep._cache_key(dc)
            if _is_prepared(std) and same_tokenizer(model_dir, std):
                return std
        except Exception:  # noqa: BLE001 - an odd recorded config: fall through
            pass
    return _cached_encoding(corpus, model_dir, vf, log)
