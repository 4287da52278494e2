"""Between the HTTP protocol and the engine: loading a model directory into a started
engine, the chat template, request -> SamplingParams, engine results -> OpenAI shapes."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from raygpt.model.chat import CHAT_TEMPLATE_FILE, ChatTemplate  # noqa: F401 (re-exported)
from raygpt.serving.engine import Engine, SamplingParams, TokenLogprob
from raygpt.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from raygpt.serving.settings import ServerSettings


def load_engine(model_dir: str, s: ServerSettings, name: str, observer=None) -> Engine:
    """Load a model dir and return a started, warmed-up Engine (raises ModelDirError/UserError)."""
    import torch

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.model.io import TOKENIZER, ModelDirError, load_model_dir

    device = s.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[s.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model, meta = load_model_dir(model_dir, device=device, dtype=dtype)
    if not (Path(model_dir) / TOKENIZER).is_file():
        raise ModelDirError(f"model directory {model_dir!r} has no {TOKENIZER}")
    tok = load_tokenizer(Path(model_dir) / TOKENIZER)
    if tok.vocab_size > model.config.vocab_size:
        raise ModelDirError(f"{model_dir!r}: tokenizer has {tok.vocab_size} tokens but the model "
                            f"only {model.config.vocab_size}")
    template = ChatTemplate.load(model_dir, s.chat_template)
    eng = Engine(model, tok, max_slots=s.max_slots, max_waiting=s.max_waiting,
                 version=meta.get("version"), name=name, step_delay_s=s.step_delay_s,
                 step_tokens=s.step_tokens, observer=observer,
                 kv_memory_fraction=s.kv_memory_fraction, kv_memory_bytes=s.kv_memory_bytes).start()
    try:  # warm up (and prove the model runs) before it takes traffic
        r = eng.submit([0], SamplingParams(max_tokens=1, temperature=0), loop=False)
        r.result(timeout=300)
    except BaseException:
        eng.abort()
        raise
    eng.meta = meta
    eng.model_dir = str(model_dir)
    eng.loaded_at = int(time.time())
    eng.chat_template = template
    return eng


# --------------------------------------------------------------------------- chat


# ChatTemplate lives in the model layer (raygpt/model/chat.py): the HF export writes it as Jinja.


# --------------------------------------------------------------------------- params


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                    stop: list[str], j: int) -> SamplingParams:
    """The j-th choice's params (seeded choices get seed + j, wrapped to 64 bits)."""
    seed = None if req.seed is None else (req.seed + j) % (1 << 64)
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        echo = False
    else:
        logprobs, echo = req.logprobs, req.echo
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature,
        top_k=req.top_k if req.top_k and req.top_k > 0 else None,  # 0 and vLLM's -1: off
        top_p=req.top_p, stop=stop, seed=seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logit_bias=req.token_bias(),
        logprobs=logprobs, echo=echo, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        ignore_eos=req.ignore_eos, stop_token_ids=tuple(req.stop_token_ids or ()))


def choice_params(first: SamplingParams, j: int) -> SamplingParams:
    """Choice j's params from choice 0's: a shallow copy (the logit_bias dict is shared,
    not rebuilt from the request per choice: a full-vocabulary bias is 50k entries) with
    seed + j, wrapped to 64 bits."""
    seed = None if first.seed is None else (first.seed + j) % (1 << 64)
    return replace(first, seed=seed)


def check_max_tokens(max_tokens: int, limit: int, param: str = "max_tokens") -> None:
    if max_tokens > limit:
        raise ApiError(400, f"{param}={max_tokens} is above the limit of {limit}",
                       param=param, code="max_tokens_too_large")


# --------------------------------------------------------------------------- logprobs


class LegacyLogprobs:
    """OpenAI completions' logprobs: tokens, token_logprobs, top_logprobs, text_offset,
    built incrementally (streaming sends the new part with each chunk). Offsets count
    characters of the choice's text (the prompt first with echo)."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tok = tokenizer
        self.offset = offset

    def _s(self, t: int) -> str:
        return self.tok.decode([t])

    def part(self, entries: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            s = self._s(e.token_id)
            out["tokens"].append(s)
            out["token_logprobs"].append(e.logprob)
            # the top k and the sampled token (k + 1 when it is not among them: OpenAI, vLLM)
            out["top_logprobs"].append(
                None if e.logprob is None else {**{self._s(t): lp for t, lp in e.top}, s: e.logprob})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def one(t: int, lp: float) -> dict:
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob),
                         "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}
