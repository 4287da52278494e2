"""Hugging Face GPT-2 directories, both ways, with no code of transformers.

A HF GPT-2 directory is `config.json` (model_type gpt2, GPT2LMHeadModel),
`model.safetensors` (or shards + `model.safetensors.index.json`) and `tokenizer.json`.
raygpt's GPT is GPT-2's architecture, so the mapping is exact:

- Conv1D stores weights as (in, out): raygpt's Linear wants (out, in), a transpose.
- `c_attn` is q, k and v fused along the output: raygpt keeps them separate (tensor
  parallelism shards them by heads), so it is split in three / concatenated back.
- GPT-2 has biases everywhere: imported models get `bias=True`; a raygpt model without
  biases exports zeros (the same function).
- The vocabulary (50257) is padded to a multiple of 64 for fast matmuls; the padded rows
  are zeros, `real_vocab_size` keeps them from ever being predicted, and export cuts the
  table back to the tokenizer's size.
- `n_positions` is `block_size`.

Only safetensors and JSON are read: `pytorch_model.bin` is a pickle, and unpickling a
file runs whatever code it names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from raygpt.model.chat import ChatTemplate
from raygpt.model.files import CONFIG, TOKENIZER, WEIGHTS, ModelDirError, atomic_dir
from raygpt.model.gpt import GPT, GPTConfig

INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
EOS_TOKEN = "<|endoftext|>"
VOCAB_MULTIPLE = 64
# Activations that are GPT-2's tanh-approximated GELU under another name.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Keys of saved GPT-2 checkpoints that are buffers (the causal mask), not weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


class HFDirError(ModelDirError):
    """A Hugging Face directory raygpt cannot import (one line: file and reason)."""


def is_hf_config(cfg: dict) -> bool:
    """A transformers config.json (raygpt's own has a 'model' section instead)."""
    return isinstance(cfg, dict) and "model" not in cfg and ("model_type" in cfg or "architectures" in cfg)


def padded_vocab(v: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return ((v + multiple - 1) // multiple) * multiple


# ----------------------------------------------------------------------------- import


def gpt_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """Check that config.json describes a GPT-2 raygpt can run exactly; -> GPTConfig."""
    mt = hf.get("model_type")
    arch = hf.get("architectures") or []
    if mt != "gpt2":
        name = f" ({', '.join(arch)})" if arch else ""
        raise HFDirError(f"{where}: model_type {mt!r}{name} is not GPT-2; raygpt imports "
                         f"GPT2LMHeadModel checkpoints only")
    try:
        n_layer, n_head, n_embd = int(hf["n_layer"]), int(hf["n_head"]), int(hf["n_embd"])
        vocab, n_pos = int(hf["vocab_size"]), int(hf["n_positions"])
    except (KeyError, TypeError, ValueError) as e:
        raise HFDirError(f"{where}: missing or bad GPT-2 field {e}") from None
    checks = [
        (hf.get("activation_function", "gelu_new") in TANH_GELUS, "activation_function",
         f"must be one of {', '.join(TANH_GELUS)} (tanh GELU)"),
        (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "layer_norm_epsilon",
         "must be 1e-05"),
        (hf.get("n_inner") in (None, 4 * n_embd), "n_inner", f"must be null or {4 * n_embd} (4 x n_embd)"),
        (hf.get("scale_attn_weights", True) is True, "scale_attn_weights", "must be true"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx",
         "must be false"),
        (not hf.get("add_cross_attention", False), "add_cross_attention", "must be false"),
        (hf.get("tie_word_embeddings", True) is not False, "tie_word_embeddings",
         "must be true (raygpt ties the output head to the token embeddings)"),
        (n_embd % n_head == 0, "n_embd", f"{n_embd} is not divisible by n_head={n_head}"),
    ]
    for ok, field, why in checks:
        if not ok:
            raise HFDirError(f"{where}: {field}={hf.get(field)!r} {why}")
    padded = padded_vocab(vocab)
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_pos,
                     vocab_size=padded, dropout=float(hf.get("resid_pdrop", 0.0) or 0.0), bias=True,
                     real_vocab_size=vocab if padded != vocab else None)


def refuse_pickles(path: Path) -> None:
    """A directory whose weights exist only as a pickle: say why it is not loaded."""
    if not (path / WEIGHTS).is_file() and not (path / INDEX).is_file():
        pickles = [n for n in PICKLES if (path / n).is_file()]
        if pickles:
            raise HFDirError(
                f"{str(path)!r} holds only {pickles[0]}: raygpt does not load pickle files "
                f"(unpickling can run arbitrary code); save it as {WEIGHTS} (transformers: "
                f"save_pretrained(DIR, safe_serialization=True))")


def check_hf_files(path: Path) -> None:
    """Weights as safetensors and a tokenizer.json, or a one-line reason."""
    refuse_pickles(path)
    if not (path / WEIGHTS).is_file() and not (path / INDEX).is_file():
        raise HFDirError(f"{str(path)!r} has no {WEIGHTS}")
    if not (path / TOKENIZER).is_file():
        hint = (" (it has vocab.json/merges.txt: write tokenizer.json with "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
                if (path / "vocab.json").is_file() else "")
        raise HFDirError(f"{str(path)!r} has no {TOKENIZER}{hint}")


def weight_files(path: Path) -> list[Path]:
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    try:
        idx = json.loads((path / INDEX).read_text())
        names = sorted(set(idx["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as e:
        raise HFDirError(f"{str(path / INDEX)!r}: bad index ({e})") from None
    return [path / n for n in names]


_VERSIONS: dict[tuple, str] = {}


def weights_version(path: Path) -> str:
    """sha256 prefix of the weight files' bytes (cached per file size and mtime)."""
    files = weight_files(path)
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _VERSIONS:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _VERSIONS[key] = h.hexdigest()[:12]
    return _VERSIONS[key]


def read_hf_meta(path: Path, hf: dict) -> dict:
    """raygpt's view of a HF directory: {"model": GPTConfig fields, "version", ...}."""
    cfg = gpt_config_from_hf(hf, str(path / CONFIG))
    check_hf_files(path)
    meta = {"model": dataclasses.asdict(cfg), "version": weights_version(path), "format": "hf",
            "source": str(path)}
    extra = hf.get("raygpt")  # written by our export: where the model came from
    if isinstance(extra, dict):
        meta.update({k: v for k, v in extra.items() if k in ("raygpt_config", "step", "val_loss")})
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise HFDirError(f"{str(f)!r}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return sd


def hf_to_raygpt_state(sd: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensor names/layouts -> raygpt's (float32, vocab padded with zero rows)."""
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in sd.items()}
    used: set[str] = set()

    def take(name: str, shape: tuple) -> torch.Tensor:
        t = sd.get(name)
        if t is None:
            raise HFDirError(f"{where}: tensor {name!r} is missing")
        if tuple(t.shape) != shape:
            raise HFDirError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        used.add(name)
        return t.float()

    C, V, L = cfg.n_embd, cfg.n_real_vocab, cfg.n_layer
    wte = take("wte.weight", (V, C))
    out = {"wte.weight": torch.cat([wte, wte.new_zeros(cfg.vocab_size - V, C)]),
           "wpe.weight": take("wpe.weight", (cfg.block_size, C)),
           "ln_f.weight": take("ln_f.weight", (C,)), "ln_f.bias": take("ln_f.bias", (C,))}
    for i in range(L):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = take(h + ln + ".weight", (C,))
            out[b + ln + ".bias"] = take(h + ln + ".bias", (C,))
        qkv_w = take(h + "attn.c_attn.weight", (C, 3 * C)).t()  # Conv1D (in, out) -> (out, in)
        qkv_b = take(h + "attn.c_attn.bias", (3 * C,))
        for j, n in enumerate(("wq", "wk", "wv")):
            out[b + f"attn.{n}.weight"] = qkv_w[j * C:(j + 1) * C].contiguous()
            out[b + f"attn.{n}.bias"] = qkv_b[j * C:(j + 1) * C].contiguous()
        for mod, (i_, o_) in (("attn.c_proj", (C, C)), ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))):
            out[b + mod + ".weight"] = take(h + mod + ".weight", (i_, o_)).t().contiguous()
            out[b + mod + ".bias"] = take(h + mod + ".bias", (o_,))
    head = sd.get("lm_head.weight")
    if head is not None:
        if not torch.equal(head.float(), wte):
            raise HFDirError(f"{where}: lm_head.weight differs from wte.weight; raygpt ties them")
        used.add("lm_head.weight")
    extra = [k for k in sd if k not in used and not k.endswith(_BUFFERS)]
    if extra:
        raise HFDirError(f"{where}: unexpected tensors for GPT2LMHeadModel ({', '.join(sorted(extra)[:3])})")
    return out


def load_hf_model(path: Path, meta: dict) -> GPT:
    cfg = GPTConfig(**meta["model"])
    sd = hf_to_raygpt_state(_read_weights(path), cfg, str(path))
    model = GPT.empty(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # tied
    return model


# ----------------------------------------------------------------------------- export


def raygpt_to_hf_state(model: GPT, vocab: int) -> dict[str, torch.Tensor]:
    """raygpt names/layouts -> GPT2LMHeadModel's (zero biases where the model has none)."""
    cfg = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    C = cfg.n_embd

    def bias(name: str, n: int) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(n)

    out = {"transformer.wte.weight": sd["wte.weight"][:vocab],
           "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": bias("ln_f.bias", C)}
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[h + ln + ".weight"] = sd[b + ln + ".weight"]
            out[h + ln + ".bias"] = bias(b + ln + ".bias", C)
        out[h + "attn.c_attn.weight"] = torch.cat(
            [sd[b + f"attn.{n}.weight"] for n in ("wq", "wk", "wv")]).t()
        out[h + "attn.c_attn.bias"] = torch.cat([bias(b + f"attn.{n}.bias", C) for n in ("wq", "wk", "wv")])
        for mod, o_ in (("attn.c_proj", C), ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
            out[h + mod + ".weight"] = sd[b + mod + ".weight"].t()
            out[h + mod + ".bias"] = bias(b + mod + ".bias", o_)
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(cfg: GPTConfig, vocab: int, eos_id: int | None, extra: dict | None = None) -> dict:
    d = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": vocab, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "use_cache": True, "dtype": "float32", "torch_dtype": "float32",  # v5 and v4 names
    }
    if extra:
        d["raygpt"] = extra
    return d


def char_tokenizer_json(chars: list[str]) -> str:
    """A char vocabulary as a `tokenizers` model with the same ids: BPE over the
    characters with no merges (each character one token) and a decoder that joins them
    with nothing in between."""
    from tokenizers import Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def _tokenizer_files(tokenizer_path: Path, block_size: int) -> tuple[str, dict, int, int | None]:
    """-> (tokenizer.json text, tokenizer_config.json, vocab size, eos id)."""
    from raygpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    tcfg: dict = {"model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if tok.kind == "char":
        text = char_tokenizer_json(tok.chars)
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        text = tok.to_str()
        tcfg.update(tokenizer_class="GPT2TokenizerFast", add_prefix_space=False)
        if tok.eos_id is not None:
            tcfg.update(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    return text, tcfg, tok.vocab_size, tok.eos_id


def save_hf_dir(model: GPT, out: str | os.PathLike, tokenizer_path: str | os.PathLike | None,
                extra: dict | None = None, chat_template: ChatTemplate | None = None) -> Path:
    """Write a directory GPT2LMHeadModel.from_pretrained and AutoTokenizer load (atomic).
    chat_template (default: raygpt's built-in) goes into tokenizer_config.json as Jinja, so
    `apply_chat_template` and vLLM render what raygpt's chat endpoint renders; config.json's
    "raygpt" section keeps it as raygpt's keys (its `stop` is what a vLLM client sends)."""
    from safetensors.torch import save_file

    out = Path(out)
    if tokenizer_path is None or not Path(tokenizer_path).is_file():
        raise HFDirError(f"--format hf needs the model's tokenizer.json (none at {tokenizer_path})")
    cfg = model.config
    tok_text, tok_cfg, vocab, eos = _tokenizer_files(Path(tokenizer_path), cfg.block_size)
    chat_template = chat_template or ChatTemplate()
    tok_cfg["chat_template"] = chat_template.to_jinja()
    extra = {**(extra or {}), "chat_template": chat_template.to_dict()}
    if vocab > cfg.n_real_vocab:
        raise HFDirError(f"the tokenizer has {vocab} tokens but the model only {cfg.n_real_vocab}")
    with atomic_dir(out) as tmp:
        save_file(raygpt_to_hf_state(model, vocab), str(tmp / WEIGHTS), metadata={"format": "pt"})
        files = {CONFIG: hf_config(cfg, vocab, eos, extra), TOKENIZER_CONFIG: tok_cfg,
                 GENERATION_CONFIG: {"bos_token_id": eos, "eos_token_id": eos}}
        for name, obj in files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        (tmp / TOKENIZER).write_text(tok_text + "\n", encoding="utf-8")
    return out
