"""What the engine takes and gives: sampling parameters, requests and their events, the
engine's errors, and the observer hooks. No torch here (a request's torch.Generator is
made by the engine)."""
from __future__ import annotations

import asyncio
import itertools
import math
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from raygpt.errors import UserError
from raygpt.serving.constants import GREEDY_EPS, MAX_LOGPROBS, MAX_STOP_CHARS, SEED_MAX, SEED_MIN


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
        for t, b in self._bias_to_check(vocab_size).items():
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

    def _bias_to_check(self, vocab_size: int | None) -> dict[int, float]:
        """logit_bias when some entry may be out of range, else {}: a full-vocabulary
        bias (50k entries) is checked once per choice on the server's event loop, so the
        common case is decided by C loops (min, max, sum: NaN or inf makes the sum
        non-finite) and only a bad one is walked entry by entry, for the message."""
        b = self.logit_bias or {}
        if not b:
            return {}
        ids_ok = vocab_size is None or (min(b) >= 0 and max(b) < vocab_size)
        vals = b.values()
        if ids_ok and math.isfinite(sum(vals)) and -100 <= min(vals) and max(vals) <= 100:
            return {}
        return b

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
        # the same prompt prefilled once (n > 1): a follower waits for its source's prefill
        # and copies the source's KV rows (see Scheduler.admit)
        self.source: Request | None = None
        self.followers: list[Request] = []
        self.copy_from: tuple[int, int] | None = None  # (slot, tokens) to copy at admission
        self.generated: list[int] = []
        self.counts: dict[int, int] = {}         # generated token -> count (penalties)
        self.dense: Any = None                   # sampler._DenseRow: bias/penalty vectors, built once
        self.prefix_offset = self.read_offset = 0  # incremental detokenization window
        self.text = ""                           # decoded output so far (before stop cut)
        self.emitted_chars = 0
        self.finish_reason: str | None = None
        self.generator: Any = None               # a torch.Generator for a seeded request
        self.prompt_logprobs: list[TokenLogprob] | None = (
            [TokenLogprob(prompt_ids[0], None)] if params.echo and params.logprobs is not None
            else None)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None

    # -- producer side (engine thread) --
    def stamp(self, now: float, observer: "Observer") -> None:
        """A token came at `now`: the first one's wait (TTFT) or the gap since the last
        (ITL) to the observer."""
        if self.first_token_at is None:
            self.first_token_at = now
            observer.first_token(now - self.submitted_at)
        else:
            observer.inter_token(now - self.last_token_at)
        self.last_token_at = now

    def _put(self, ev: Event) -> None:
        if ev.finish_reason is not None:
            self.done = True
        if self._aq is not None:
            box = self.engine.outbox() if self.engine is not None else None
            if box is not None:  # the engine thread, sampling a batch: one wake-up for all
                box.append((self, ev))
                return
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


def deliver(events: list[tuple["Request", Event]]) -> None:
    """Events of one sampled batch to their requests' event loops, one
    call_soon_threadsafe per loop: each call writes the loop's self-pipe and wakes it, and
    once per token (32 per step at 32 streams) the loop's wake-ups contended with the
    engine thread for the GIL and the CPU."""
    by_loop: dict[Any, list[tuple[Request, Event]]] = {}
    for r, ev in events:
        by_loop.setdefault(r.loop, []).append((r, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the loop is closed: nobody is listening
            for r, _ in items:
                r.cancelled = True


def _put_all(items: list[tuple["Request", Event]]) -> None:
    for r, ev in items:
        r._aq.put_nowait(ev)


class Observer:
    """Hooks the server's metrics attach to (called on the engine thread; keep them cheap)."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def finished(self, reason: str, tokens: int) -> None: ...
