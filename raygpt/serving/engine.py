"""Continuous-batching generation engine: pure torch, no Ray (testable on its own).

One background thread owns the model and a preallocated `KVCache` with `max_slots`
slots. Each iteration of its loop (`_step`)

1. admits waiting requests into free slots (a cancelled waiting request leaves the
   queue at once, see `Request.cancel`);
2. runs ONE batched decode step (T=1) over every running request, each row at its own
   position, and samples one token per row with the row's own parameters;
3. spends what is left of the per-step token budget (`step_tokens`) on prefill: prompts
   are prefilled in chunks (chunked prefill), so a burst of long prompts costs running
   streams at most one budget's worth of compute per token instead of stalling them.
   The output head runs at each prompt's last position only (unless the request asked
   for prompt logprobs, `echo`); a finished prefill samples the first token;
4. streams each request's new text (incremental detokenization: the cost per token is
   flat in the output length) and frees the slot of a finished request at once.

A failure while sampling one row (e.g. a distribution that is all -inf) fails only that
request; a failed forward fails the rows in it. `consecutive_failed_steps` counts steps
in a row where a forward failed: the server's health check reports the replica broken
beyond a bound (a broken GPU), so Serve replaces it.

Context length policy: the prompt must be 1..block_size tokens (longer -> `PromptTooLong`).
`max_tokens` beyond the room left in the context is *capped*: generation ends with
finish_reason "length" when prompt + generated reaches block_size, exactly like
`GPT.generate` (what `raygpt generate` uses), so greedy output is identical to it.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from raygpt.errors import UserError
from raygpt.model.gpt import GPT, KVCache, as_slots, sample_next

log = logging.getLogger("raygpt.serving.engine")

# Temperatures below this sample greedily: dividing logits by 1e-300 overflows to inf/nan.
GREEDY_EPS = 1e-5
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 5
# A stop string longer than this is refused: the hold-back scan costs its length per token.
MAX_STOP_CHARS = 256


class _DenseRow:
    """One request's per-token vectors on the engine's device: the logit bias, counts of
    its generated tokens (presence/frequency penalties) and the tokens seen in prompt or
    output (repetition penalty). Built on first use, then updated one token at a time."""

    @staticmethod
    def wanted(p: SamplingParams) -> bool:
        return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty
                    or p.repetition_penalty != 1.0 or (p.min_p > 0 and not p.greedy))

    def __init__(self, r: "Request", vocab: int, device):
        p = r.params
        self.bias = self.counts = self.seen = None
        if p.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            self.bias[torch.tensor(list(p.logit_bias), device=device)] = torch.tensor(
                list(p.logit_bias.values()), device=device)
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
            for t, c in r.counts.items():
                self.counts[t] = c
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(r.prompt_ids + r.generated, device=device)] = True

    def add(self, tok: int) -> None:
        if self.counts is not None:
            self.counts[tok] += 1
        if self.seen is not None:
            self.seen[tok] = True

    def apply(self, row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        if self.bias is not None:
            row = row + self.bias
        if self.counts is not None:
            row = row - self.counts * p.frequency_penalty - (self.counts > 0) * p.presence_penalty
        if self.seen is not None:
            rp = p.repetition_penalty
            row = torch.where(self.seen, torch.where(row > 0, row / rp, row * rp), row)
        if p.min_p > 0 and not p.greedy:
            # p_i < min_p * p_max  <=>  logit_i < logit_max + T * ln(min_p)
            row = row.masked_fill(row < row.max() + p.temperature * math.log(p.min_p), float("-inf"))
        return row


class EngineError(Exception):
    """Base class of the engine's errors."""


class InvalidRequest(UserError, EngineError):
    """A request the engine refuses (HTTP 400). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class PromptTooLong(InvalidRequest):
    def __init__(self, message: str):
        super().__init__(message, param="prompt", code="context_length_exceeded")


class EngineClosed(EngineError):
    """The engine is draining or stopped (a newer model took over): submit elsewhere."""


class EngineOverloaded(EngineError):
    """Too many requests waiting for a slot (HTTP 503)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16                 # 0 only with echo (score the prompt, generate nothing)
    temperature: float = 1.0             # < GREEDY_EPS = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0        # OpenAI semantics, on generated tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None          # None: no logprobs; k: the chosen token's + top k
    echo: bool = False                   # also compute the prompt's logprobs
    # vLLM's extensions, with its semantics
    min_p: float = 0.0                   # drop tokens below min_p x the likeliest's probability
    repetition_penalty: float = 1.0      # on tokens in the prompt or output: logit / p if > 0 else x p
    ignore_eos: bool = False             # keep generating past the end-of-text token
    stop_token_ids: Sequence[int] = ()   # these tokens end the output like end-of-text

    def validate(self, vocab_size: int | None = None) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0 or (
                self.max_tokens == 0 and not self.echo):
            raise InvalidRequest(f"max_tokens must be a positive integer (0 only with echo), "
                                 f"got {self.max_tokens!r}", "max_tokens")
        if self.temperature is None or not self.temperature >= 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k!r}", "top_k")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be a 64-bit integer, got {self.seed}", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {v!r}", name)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}", "logprobs")
        for t, b in (self.logit_bias or {}).items():
            if vocab_size is not None and not 0 <= t < vocab_size:
                raise InvalidRequest(f"logit_bias: token id {t} is outside the vocabulary "
                                     f"(0..{vocab_size - 1})", "logit_bias")
            if not -100 <= b <= 100:
                raise InvalidRequest(f"logit_bias: bias {b} of token {t} is outside [-100, 100]",
                                     "logit_bias")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("stop strings must be non-empty strings", "stop")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop strings are limited to {MAX_STOP_CHARS} characters", "stop")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not self.repetition_penalty > 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                                 "repetition_penalty")
        for t in self.stop_token_ids:
            if vocab_size is not None and not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop_token_ids: {t} is outside the vocabulary", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability (None for a prompt's first
    token) and the `top` alternatives [(token_id, logprob)], best first."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """One streamed update of a request: new text, the new token ids (with their logprobs
    when asked for), and at the end finish_reason ("stop" | "length" | "cancelled" |
    "error") with `error` set on errors."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Request:
    """A submitted generation. Iterate `events()` (sync) or `aevents()` (async), or call
    `result()` / `await aresult()`. `cancel()` frees its slot at the next step (and
    takes a waiting request out of the queue at once)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop=None, engine=None):
        self.id = next(Request._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.engine = engine
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._q: queue.Queue | None = None if loop is not None else queue.Queue()
        self.cancelled = False
        self.done = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        # engine-side state
        self.slot: int | None = None
        self.prefilled = 0                       # prompt tokens already in the KV cache
        self.generated: list[int] = []
        self.counts: dict[int, int] = {}         # generated token -> count (penalties)
        self.dense: "_DenseRow | None" = None    # bias/penalty vectors, built once (engine thread)
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window
        self.text = ""                           # decoded output so far (before stop cut)
        self.emitted_chars = 0
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [TokenLogprob(prompt_ids[0], None)] if params.echo and params.logprobs is not None
            else None)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None

    # -- producer side (engine thread) --
    def _put(self, ev: Event) -> None:
        if ev.finish_reason is not None:
            self.done = True
        if self._aq is not None:
            try:
                self.loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody is listening
                self.cancelled = True
        else:
            self._q.put(ev)

    # -- consumer side --
    def cancel(self) -> None:
        self.cancelled = True
        if self.engine is not None and not self.done:
            self.engine._drop_waiting(self)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        if self._q is None:
            raise RuntimeError("this request was submitted from an event loop: use aevents()")
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev.finish_reason is not None:
                return

    async def aevents(self):
        """Async iterator of events; each item merges all events already queued."""
        if self._aq is None:
            raise RuntimeError("this request was submitted outside an event loop: use events()")
        while True:
            ev = await self._aq.get()
            while ev.finish_reason is None and not self._aq.empty():
                nxt = self._aq.get_nowait()
                ev = Event(ev.text + nxt.text, ev.token_ids + nxt.token_ids,
                           nxt.finish_reason, nxt.error, ev.logprobs + nxt.logprobs)
            yield ev
            if ev.finish_reason is not None:
                return

    def _completion(self, text: str, finish: str) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        return Completion(text, list(self.generated), finish, len(self.prompt_ids),
                          len(self.generated), ttft, self.logprobs, self.prompt_logprobs)

    def result(self, timeout: float | None = None) -> Completion:
        parts, finish, err = [], None, None
        for ev in self.events(timeout):
            parts.append(ev.text)
            finish, err = ev.finish_reason, ev.error
        if finish == "error":
            raise EngineError(err)
        return self._completion("".join(parts), finish)

    async def aresult(self) -> Completion:
        parts, finish, err = [], None, None
        try:
            async for ev in self.aevents():
                parts.append(ev.text)
                finish, err = ev.finish_reason, ev.error
        finally:
            if not self.done:
                self.cancel()
        if finish == "error":
            raise EngineError(err)
        return self._completion("".join(parts), finish)


class Observer:
    """Hooks the server's metrics attach to (called on the engine thread; keep them cheap)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, reason: str, tokens: int) -> None: ...


class Engine:
    """Continuous-batching engine around one GPT model and its tokenizer.

    model: a GPT in eval mode (any device/dtype); tokenizer: encode/decode/eos_id.
    max_slots: KV-cache slots = the most requests decoded together.
    max_waiting: requests allowed to wait for a slot before submit() raises EngineOverloaded.
    step_tokens: token budget of one step: decode rows count one each, prefill chunks
      take the rest (at least `min_prefill_tokens`, so prefill always progresses).
    step_delay_s: sleep added to each loop iteration (a testing aid to hold requests open).
    sample_mask: optional (V,) bool tensor of token ids never to sample (a padded
      vocabulary); ids at or beyond the tokenizer's vocabulary are always masked.
    """

    def __init__(self, model: GPT, tokenizer, max_slots: int = 16, max_waiting: int = 1024,
                 version: str | None = None, name: str = "engine", step_delay_s: float = 0.0,
                 step_tokens: int = 256, min_prefill_tokens: int = 32,
                 sample_mask: torch.Tensor | None = None, observer: Observer | None = None):
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.block_size = self.cfg.block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_slots = max_slots
        self.max_waiting = max_waiting
        self.version = version
        self.name = name
        self.step_delay_s = step_delay_s
        self.step_tokens = max(1, step_tokens)
        self.min_prefill_tokens = max(1, min_prefill_tokens)
        self.observer = observer or Observer()
        self.fault_hook: Callable[[], None] | None = None  # called each step (fault injection)
        self.cache = KVCache(self.cfg, max_slots, device=self.device, dtype=self.dtype)
        self._vocab_mask = self._build_mask(sample_mask)
        self.eos_id = getattr(tokenizer, "eos_id", None)

        self._cv = threading.Condition()
        self._waiting: list[Request] = []
        self._prefilling: list[Request] = []   # admitted, prompt not fully in the cache yet
        self._active: list[Request] = []       # decoding
        # A min-heap: the lowest free slot first keeps the running rows' slots packed,
        # so a decode step's rows are often consecutive slots (read in place, no gather).
        self._free_slots = list(range(max_slots))
        self._closing = False  # no new requests; finish what is admitted/waiting
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # counters
        self.decode_steps = 0
        self.prefills = 0
        self.prefill_batches = 0
        self.prefill_tokens = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.max_batch = 0
        self.failed_steps = 0
        self.consecutive_failed_steps = 0

    def _build_mask(self, extra: torch.Tensor | None) -> torch.Tensor | None:
        V = self.cfg.vocab_size
        mask = torch.zeros(V, dtype=torch.bool, device=self.device)
        tok_vocab = getattr(self.tokenizer, "vocab_size", None)
        real = getattr(self.cfg, "real_vocab_size", None)  # a padded model vocabulary
        for n in (tok_vocab, real):
            if n is not None and n < V:
                mask[n:] = True
        if extra is not None:
            mask |= extra.to(self.device, torch.bool)
        return mask if bool(mask.any()) else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"raygpt-{self.name}", daemon=True)
            self._thread.start()
        return self

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; let admitted and waiting ones finish; stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if wait and self._thread is not None:
            self._thread.join(timeout)

    def abort(self) -> None:
        """Stop now: every unfinished request ends with finish_reason "cancelled"."""
        with self._cv:
            self._closing = True
            for r in self._waiting + self._prefilling + self._active:
                r.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        with self._cv:
            return not (self._waiting or self._prefilling or self._active)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "version": self.version,
                "decode_steps": self.decode_steps,
                "prefills": self.prefills,
                "prefill_batches": self.prefill_batches,
                "prefill_tokens": self.prefill_tokens,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "max_batch": self.max_batch,
                "active": len(self._active) + len(self._prefilling),
                "waiting": len(self._waiting),
                "max_slots": self.max_slots,
                "failed_steps": self.failed_steps,
                "consecutive_failed_steps": self.consecutive_failed_steps,
                "closing": self._closing,
            }

    # ------------------------------------------------------------ submit

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", "prompt")
            ids = self.tokenizer.encode(prompt)  # UserError on unknown characters
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
            if bad:
                raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary "
                                     f"(0..{self.cfg.vocab_size - 1})", "prompt")
        if not ids:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if len(ids) > self.block_size:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens long; this model's context "
                                f"(block_size) is {self.block_size} tokens")
        return ids

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               loop: asyncio.AbstractEventLoop | None | bool = None) -> Request:
        """Queue a request. Called inside a running event loop (or with loop=<a loop>), the
        request streams through an asyncio.Queue of that loop (use `aevents()`/`aresult()`);
        otherwise (or with loop=False) through a queue.Queue (`events()`/`result()`)."""
        params = params or SamplingParams()
        params.validate(self.cfg.vocab_size)
        ids = self.encode(prompt)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        req = Request(ids, params, loop or None, engine=self)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(int(params.seed))
        with self._cv:
            if self._closing:
                raise EngineClosed(f"engine {self.name} is not accepting requests")
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting "
                                       "for a slot")
            self._waiting.append(req)
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return req

    def _drop_waiting(self, r: Request) -> None:
        with self._cv:
            if r in self._waiting:
                self._waiting.remove(r)
                r._put(Event(finish_reason="cancelled"))

    def generate(self, prompt, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Completion:
        """Blocking convenience (not from inside an event loop's thread)."""
        return self.submit(prompt, params, loop=False).result(timeout)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._waiting or self._prefilling or self._active
                               or self._closing):
                        self._cv.wait()
                    if self._closing and not (self._waiting or self._prefilling or self._active):
                        break
                    while self._waiting and self._free_slots:
                        r = self._waiting.pop(0)
                        r.slot = heapq.heappop(self._free_slots)
                        self._prefilling.append(r)
                self._step()
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
        finally:
            with self._cv:
                for r in self._waiting + self._prefilling + self._active:
                    if not r.done:
                        r._put(Event(finish_reason="cancelled"))
                self._waiting, self._prefilling, self._active = [], [], []
            self._stopped.set()

    def _fail(self, reqs: list[Request], e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        for r in reqs:
            if not r.done:
                r._put(Event(finish_reason="error", error=msg))

    def _release(self, r: Request) -> None:
        if r.slot is not None:
            heapq.heappush(self._free_slots, r.slot)
            r.slot = None

    def _reap(self) -> None:
        with self._cv:
            for lst in (self._active, self._prefilling):
                keep = []
                for r in lst:
                    if r.cancelled and not r.done:
                        r._put(Event(finish_reason="cancelled"))
                    if r.done:
                        self._release(r)
                    else:
                        keep.append(r)
                lst[:] = keep

    @torch.inference_mode()
    def _step(self) -> None:
        self._reap()
        failed = False
        try:
            if self.fault_hook is not None:
                self.fault_hook()
        except Exception as e:  # an injected device failure: every running row fails
            log.error("engine step failed: %s", e)
            self._fail(self._active + self._prefilling, e)
            failed = True
        if not failed:
            failed = self._decode() | self._prefill()
        with self._cv:
            if failed:
                self.failed_steps += 1
                self.consecutive_failed_steps += 1
            else:
                self.consecutive_failed_steps = 0
        self._reap()

    def _decode(self) -> bool:
        """One decode step over all running requests. -> True when the forward failed."""
        # In slot order: consecutive slots let forward_cached read the cache in place.
        batch = sorted((r for r in self._active if not r.done), key=lambda r: r.slot)
        if not batch:
            return False
        try:
            idx = torch.tensor([[r.generated[-1]] for r in batch], dtype=torch.long,
                               device=self.device)
            pos = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch]
            logits = self._forward(idx, [r.slot for r in batch], pos)[:, -1]
        except Exception as e:  # a bug or a device error: fail these rows, keep serving
            log.exception("decode step failed")
            self._fail(batch, e)
            return True
        with self._cv:
            self.decode_steps += 1
            self.max_batch = max(self.max_batch, len(batch))
        self._sample_and_emit(logits, batch)
        return False

    def _prefill(self) -> bool:
        """Prefill chunks within the step's remaining token budget. -> True on a failure."""
        budget = max(self.step_tokens - len(self._active), self.min_prefill_tokens)
        chunks: list[tuple[Request, int]] = []  # (request, chunk length)
        for r in self._prefilling:
            if budget <= 0:
                break
            if r.done:
                continue
            n = min(len(r.prompt_ids) - r.prefilled, budget)
            chunks.append((r, n))
            budget -= n
        failed = False
        for group in self._groups(chunks):
            try:
                self._prefill_group(group)
            except Exception as e:
                log.exception("prefill failed")
                self._fail([r for r, _ in group], e)
                failed = True
        return failed

    def _groups(self, chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Chunks batched by length, right-padded: padded tokens <= step_tokens, every row's
        padded end inside the context, and prompt-logprob rows (head over every position)
        on their own."""
        groups, cur = [], []
        for r, n in sorted(chunks, key=lambda c: c[1]):
            full = r.prompt_logprobs is not None
            if full:
                groups.append([(r, n)])
                continue
            fits = (len(cur) + 1) * n <= self.step_tokens and all(
                q.prefilled + n <= self.block_size for q, _ in cur + [(r, n)])
            if cur and not fits:
                groups.append(cur)
                cur = []
            cur.append((r, n))
        if cur:
            groups.append(cur)
        return groups

    def _prefill_group(self, group: list[tuple[Request, int]]) -> None:
        T = max(n for _, n in group)
        ids = torch.zeros((len(group), T), dtype=torch.long)
        for i, (r, n) in enumerate(group):
            ids[i, :n] = torch.tensor(r.prompt_ids[r.prefilled:r.prefilled + n], dtype=torch.long)
        full = group[0][0].prompt_logprobs is not None  # such a row is alone in its group
        last = None if full else [n - 1 for _, n in group]
        logits = self._forward(ids.to(self.device), [r.slot for r, _ in group],
                               [r.prefilled for r, _ in group], last)
        if full:
            self._record_prompt_logprobs(group[0][0], logits[0, :group[0][1]])
        with self._cv:
            self.prefill_batches += 1
            self.prefill_tokens += sum(n for _, n in group)
        done_rows, done_reqs = [], []
        for i, (r, n) in enumerate(group):
            r.prefilled += n
            if r.prefilled == len(r.prompt_ids):
                done_rows.append(i if not full else n - 1)
                done_reqs.append(r)
        if not done_reqs:
            return
        with self._cv:
            self.prefills += len(done_reqs)
            for r in done_reqs:
                self._prefilling.remove(r)
        sampled = []
        for r in done_reqs:
            if r.params.max_tokens == 0:  # echo only: score the prompt, generate nothing
                self._finish_without_tokens(r)
            else:
                sampled.append(r)
        if sampled:
            rows = torch.tensor([done_rows[done_reqs.index(r)] for r in sampled],
                                device=self.device)
            last_logits = logits[rows, 0] if not full else logits[0, rows]
            with self._cv:
                self._active.extend(sampled)
            self._sample_and_emit(last_logits, sampled)

    def _forward(self, idx: torch.Tensor, slots, pos, last: list[int] | None = None):
        """GPT.forward_cached with the head at chosen positions only: `last[b]` is the
        position within row b whose logits are wanted -> (B,1,V); None -> every position
        (B,T,V). Padding beyond a row's chunk writes junk k/v in its slot that the next
        chunk or decode step overwrites before any query can see it."""
        m = self.model
        B, T = idx.shape
        dev = idx.device
        slots = as_slots(slots, dev)
        pos = torch.as_tensor(pos, device=dev, dtype=torch.long)
        qpos = pos[:, None] + torch.arange(T, device=dev)[None, :]
        L = int(qpos.max()) + 1
        if L > self.block_size:
            raise ValueError(f"position {L - 1} >= block_size {self.block_size}")
        attn_mask = torch.arange(L, device=dev)[None, None, :] <= qpos[:, :, None]
        x = m.wte(idx) + m.wpe(qpos)
        for block, layer_cache in zip(m.blocks.values(), self.cache.layers):
            x = block.forward_cached(x, layer_cache, slots, pos, attn_mask)
        if last is not None:
            x = x[torch.arange(B, device=dev), torch.as_tensor(last, device=dev)][:, None]
        return m.lm_head(m.ln_f(x))

    # ------------------------------------------------------------ sampling

    def _top(self, lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        v, i = torch.topk(lp, k)
        return list(zip(i.tolist(), v.tolist()))

    def _record_prompt_logprobs(self, r: Request, logits: torch.Tensor) -> None:
        """logits (n, V) of a chunk: position j predicts prompt token prefilled + j + 1."""
        lp = torch.log_softmax(self._mask(logits.float()), dim=-1)
        k = r.params.logprobs or 0
        start = r.prefilled
        for j in range(logits.shape[0]):
            t = start + j + 1
            if t >= len(r.prompt_ids):
                break
            tok = r.prompt_ids[t]
            r.prompt_logprobs.append(TokenLogprob(tok, float(lp[j, tok]), self._top(lp[j], k)))

    def _mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self._vocab_mask is not None:
            logits = logits.masked_fill(self._vocab_mask, float("-inf"))
        return logits

    def _process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Mask, logit_bias, presence/frequency penalties (OpenAI's definitions),
        repetition penalty and min_p (vLLM's). A request's vectors are built once and
        kept up to date as tokens come (a full-vocabulary bias costs one add per step)."""
        logits = self._mask(logits.float()).clone()  # never modify the caller's tensor
        for i, r in enumerate(reqs):
            if _DenseRow.wanted(r.params):
                if r.dense is None:
                    r.dense = _DenseRow(r, logits.shape[-1], logits.device)
                logits[i] = r.dense.apply(logits[i], r.params)
        return logits

    def _sample_and_emit(self, raw: torch.Tensor, reqs: list[Request]) -> None:
        """Sample one token per row; a row whose sampling fails ends with an error alone."""
        try:
            logits = self._process(raw, reqs)
            toks = self._sample(logits, reqs)
        except Exception:  # isolate: sample each row on its own
            logits, toks = None, []
            for i, r in enumerate(reqs):
                try:
                    toks.append(self._sample(self._process(raw[i:i + 1], [r]), [r])[0])
                except Exception as e:
                    log.warning("sampling failed for one request: %s", e)
                    self._fail([r], e)
                    toks.append(None)
        for i, (r, t) in enumerate(zip(reqs, toks)):
            if t is None or r.done:
                continue
            try:
                lp = None
                if r.logprobs is not None:
                    row = logits[i] if logits is not None else self._process(raw[i:i + 1], [r])[0]
                    ls = torch.log_softmax(row, dim=-1)
                    lp = TokenLogprob(t, float(ls[t]), self._top(ls, r.params.logprobs))
                self._emit(r, t, lp)
            except Exception as e:  # e.g. a token the tokenizer cannot decode
                log.exception("emit failed")
                self._fail([r], e)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits (B,V) processed -> one token per row with each row's own parameters.
        Unseeded rows with the same parameters are sampled together; a seeded row uses its
        own generator, so its tokens do not depend on the batch. Raises on a bad row."""
        out: list[int | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                out[i] = t
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            if out[i] is None:
                p = r.params
                if r.generator is not None:
                    out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                             r.generator)[0])
                else:
                    groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temp, top_k, top_p), rows in groups.items():
            for i, t in zip(rows, sample_next(logits[rows], temp, top_k, top_p).tolist()):
                out[i] = t
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------ output

    def _detok(self, r: Request, final: bool) -> str:
        """New text of r since the last call, decoding a short window of tokens (not the
        whole output): text shows once it no longer ends in an incomplete UTF-8 sequence."""
        toks = r.generated
        prefix = self.tokenizer.decode(toks[r.prefix_offset:r.read_offset])
        new = self.tokenizer.decode(toks[r.prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            r.prefix_offset, r.read_offset = r.read_offset, len(toks)
            return new[len(prefix):]
        return ""

    def _finish_without_tokens(self, r: Request) -> None:
        r.finish_reason = "length"
        with self._cv:
            self.requests_finished += 1
        self.observer.finished("length", 0)
        r._put(Event(finish_reason="length"))

    def _emit(self, r: Request, tok: int, lp: TokenLogprob | None) -> None:
        """Record a new token of r; stream the text that is safe to show; finish if due."""
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self.observer.first_token(now - r.submitted_at)
        else:
            self.observer.inter_token(now - r.last_token_at)
        r.last_token_at = now
        r.generated.append(tok)
        r.counts[tok] = r.counts.get(tok, 0) + 1
        if r.dense is not None:
            r.dense.add(tok)
        if lp is not None:
            r.logprobs.append(lp)
        with self._cv:
            self.tokens_generated += 1
        p = r.params
        finish = None
        if (self.eos_id is not None and tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"
            r.generated.pop()  # not part of the text; put back below for the ids
            r.text += self._detok(r, final=True)
            r.generated.append(tok)
        if finish is None:
            last = len(r.generated) >= p.max_tokens or (
                len(r.prompt_ids) + len(r.generated) >= self.block_size)
            r.text += self._detok(r, final=last)
        text = r.text
        cut = len(text)
        if p.stop:
            start = max(0, r.emitted_chars - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                cut, finish = min(hits), "stop"
        if finish is None:
            if len(r.generated) >= p.max_tokens:
                finish = "length"
            elif len(r.prompt_ids) + len(r.generated) >= self.block_size:
                finish = "length"  # the context is full (same rule as GPT.generate)
        if finish is None and p.stop:  # hold back a possible start of a stop string
            hold = 0
            for s in p.stop:
                for k in range(min(len(s) - 1, cut - r.emitted_chars), hold, -1):
                    if text[cut - k:cut] == s[:k]:
                        hold = k
                        break
            cut -= hold
        delta = text[r.emitted_chars:cut] if cut > r.emitted_chars else ""
        r.emitted_chars = max(r.emitted_chars, cut)
        lps = [lp] if lp is not None else []
        if finish is not None:
            r.text = text[:cut]
            r.finish_reason = finish
            with self._cv:
                self.requests_finished += 1
            self.observer.finished(finish, len(r.generated))
            r._put(Event(delta, [tok], finish, logprobs=lps))
        else:
            r._put(Event(delta, [tok], logprobs=lps))
