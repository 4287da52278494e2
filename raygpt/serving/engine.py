"""Continuous-batching generation engine: pure torch, no Ray (testable on its own).

One background thread owns the model and a preallocated `KVCache` with `max_slots`
slots. Each iteration of its loop

1. admits waiting requests into free slots and prefills them (batched by length,
   right-padded), sampling each one's first token from its prefill logits;
2. runs ONE batched decode step (T=1) over every active slot, each row at its own
   position (`GPT.forward_cached`), and samples one token per row with the row's own
   temperature / top-k / top-p / torch.Generator;
3. streams the new text of each request to its own queue and frees the slot of a
   request that finished (stop string, EOS, max_tokens, context full, cancelled) at once,
   so a waiting request takes it at the next iteration.

Requests are created from any thread; their events are delivered through an
`asyncio.Queue` (when submitted from a running event loop) or a `queue.Queue`.

Context length policy: the prompt must be 1..block_size tokens (longer -> `PromptTooLong`).
`max_tokens` beyond the room left in the context is *capped*: generation ends with
finish_reason "length" when prompt + generated reaches block_size, exactly like
`GPT.generate` (what `raygpt generate` uses), so greedy output is identical to it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from raygpt.errors import UserError
from raygpt.model.gpt import GPT, KVCache, sample_next

log = logging.getLogger("raygpt.serving.engine")


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
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()

    def validate(self, max_tokens_limit: int | None = None) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                                 "max_tokens")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise InvalidRequest(f"max_tokens={self.max_tokens} is above the limit of "
                                 f"{max_tokens_limit}", "max_tokens")
        if self.temperature is None or self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.top_k is not None and self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k!r}", "top_k")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest("stop strings must be non-empty strings", "stop")


@dataclass
class Event:
    """One streamed update of a request: new text, the new token ids, and at the end
    finish_reason ("stop" | "length" | "cancelled" | "error") with `error` set on errors."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None


class Request:
    """A submitted generation. Iterate `events()` (sync) or `aevents()` (async), or call
    `result()` / `await aresult()`. `cancel()` frees its slot at the next step."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop=None):
        self.id = next(Request._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._q: queue.Queue | None = None if loop is not None else queue.Queue()
        self.cancelled = False
        self.done = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        # engine-side state
        self.slot: int | None = None
        self.generated: list[int] = []
        self.emitted_chars = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None

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
                           nxt.finish_reason, nxt.error)
            yield ev
            if ev.finish_reason is not None:
                return

    def _completion(self, text: str, finish: str) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted_at
        return Completion(text, list(self.generated), finish, len(self.prompt_ids),
                          len(self.generated), ttft)

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


class Engine:
    """Continuous-batching engine around one GPT model and its tokenizer.

    model: a GPT in eval mode (any device/dtype); tokenizer: encode/decode/eos_id.
    max_slots: KV-cache slots = the most requests decoded together.
    max_waiting: requests allowed to wait for a slot before submit() raises EngineOverloaded.
    step_delay_s: sleep added to each loop iteration (a testing aid to hold requests open).
    max_prefills_per_step: requests admitted per iteration (default: max_slots).
    prefill_tokens: admitted prompts are prefilled together in groups of at most this many
    (padded) tokens; a longer prompt is prefilled alone.
    """

    def __init__(self, model: GPT, tokenizer, max_slots: int = 16, max_waiting: int = 1024,
                 version: str | None = None, name: str = "engine", step_delay_s: float = 0.0,
                 max_prefills_per_step: int | None = None, prefill_tokens: int = 2048):
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
        self.max_prefills_per_step = max_prefills_per_step or max_slots
        self.prefill_tokens = prefill_tokens  # padded tokens per batched prefill (>= 1 request)
        self.cache = KVCache(self.cfg, max_slots, device=self.device, dtype=self.dtype)
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        # Padded model vocabularies: never sample an id the tokenizer cannot decode.
        self._vocab_mask = None
        if tok_vocab is not None and tok_vocab < self.cfg.vocab_size:
            self._vocab_mask = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            self._vocab_mask[tok_vocab:] = True
        self.eos_id = getattr(tokenizer, "eos_id", None)

        self._cv = threading.Condition()
        self._waiting: list[Request] = []
        self._active: list[Request] = []
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self._closing = False  # no new requests; finish what is admitted/waiting
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # counters
        self.decode_steps = 0
        self.prefills = 0
        self.prefill_batches = 0
        self.tokens_generated = 0
        self.requests_finished = 0
        self.max_batch = 0

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
            for r in self._waiting + self._active:
                r.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def closing(self) -> bool:
        return self._closing

    def stats(self) -> dict[str, Any]:
        with self._cv:
            return {
                "version": self.version,
                "decode_steps": self.decode_steps,
                "prefills": self.prefills,
                "prefill_batches": self.prefill_batches,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "max_batch": self.max_batch,
                "active": len(self._active),
                "waiting": len(self._waiting),
                "max_slots": self.max_slots,
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
        params.validate()
        ids = self.encode(prompt)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
        req = Request(ids, params, loop or None)
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

    def generate(self, prompt, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Completion:
        """Blocking convenience (not from inside an event loop's thread)."""
        return self.submit(prompt, params, loop=False).result(timeout)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._waiting and not self._active and not self._closing:
                        self._cv.wait()
                    if self._closing and not self._waiting and not self._active:
                        break
                    admit = []
                    while (self._waiting and self._free_slots
                           and len(admit) < self.max_prefills_per_step):
                        r = self._waiting.pop(0)
                        if r.cancelled:
                            r._put(Event(finish_reason="cancelled"))
                            continue
                        r.slot = self._free_slots.pop()
                        admit.append(r)
                try:
                    self._step(admit)
                except Exception as e:  # a bug or a device error: fail the batch, keep serving
                    log.exception("engine step failed")
                    with self._cv:
                        for r in self._active + [a for a in admit if a not in self._active]:
                            if not r.done:
                                r._put(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                            self._release(r)
                        self._active = []
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
        finally:
            with self._cv:
                for r in self._waiting + self._active:
                    if not r.done:
                        r._put(Event(finish_reason="cancelled"))
                self._waiting, self._active = [], []
            self._stopped.set()

    def _release(self, r: Request) -> None:
        if r.slot is not None:
            self._free_slots.append(r.slot)
            r.slot = None

    @torch.inference_mode()
    def _step(self, admit: list[Request]) -> None:
        # 1. prefill the newly admitted requests, batched: sorted by length, right-padded
        # to the longest of a group (B x T_max <= prefill_tokens). Padding writes junk k/v
        # after a prompt's end in its slot; decode overwrites each position before any
        # query can see it (keys beyond a row's position are masked), so it is harmless.
        for group in self._prefill_groups(admit):
            lens = [len(r.prompt_ids) for r in group]
            T = max(lens)
            ids = torch.zeros((len(group), T), dtype=torch.long)
            for i, r in enumerate(group):
                ids[i, :lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
            ids = ids.to(self.device)
            logits = self.model.forward_cached(ids, self.cache, [r.slot for r in group],
                                               [0] * len(group))
            last = logits[torch.arange(len(group), device=self.device),
                          torch.tensor(lens, device=self.device) - 1]
            with self._cv:
                self.prefills += len(group)
                self.prefill_batches += 1
            toks = self._sample(last, group)
            for r, t in zip(group, toks):
                self._active.append(r)
                self._emit(r, t)
        # drop finished and cancelled requests, freeing their slots
        self._reap()
        if not self._active:
            return
        # 2. one decode step over all active slots, each at its own position.
        batch = self._active
        idx = torch.tensor([[r.generated[-1]] for r in batch], dtype=torch.long, device=self.device)
        slots = [r.slot for r in batch]
        pos = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch]
        logits = self.model.forward_cached(idx, self.cache, slots, pos)[:, -1]
        with self._cv:
            self.decode_steps += 1
            self.max_batch = max(self.max_batch, len(batch))
        toks = self._sample(logits, batch)
        for r, t in zip(batch, toks):
            self._emit(r, t)
        self._reap()

    def _prefill_groups(self, admit: list[Request]) -> list[list[Request]]:
        groups: list[list[Request]] = []
        cur: list[Request] = []
        for r in sorted(admit, key=lambda r: len(r.prompt_ids)):
            if cur and (len(cur) + 1) * len(r.prompt_ids) > self.prefill_tokens:
                groups.append(cur)
                cur = []
            cur.append(r)
        if cur:
            groups.append(cur)
        return groups

    def _reap(self) -> None:
        with self._cv:
            keep = []
            for r in self._active:
                if r.done:
                    self._release(r)
                elif r.cancelled:
                    r._put(Event(finish_reason="cancelled"))
                    self._release(r)
                else:
                    keep.append(r)
            self._active = keep

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits (B,V) -> one token per row with each row's own sampling parameters."""
        if self._vocab_mask is not None:
            logits = logits.masked_fill(self._vocab_mask, float("-inf"))
        out: list[int | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.params.temperature <= 0]
        if greedy:
            am = logits[greedy].float().argmax(dim=-1).tolist()
            for i, t in zip(greedy, am):
                out[i] = t
        # Unseeded rows with the same parameters are sampled together (one call per group);
        # a seeded row uses its own generator, so its tokens do not depend on the batch.
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
            toks = sample_next(logits[rows], temp, top_k, top_p).tolist()
            for i, t in zip(rows, toks):
                out[i] = t
        return out  # type: ignore[return-value]

    def _emit(self, r: Request, tok: int) -> None:
        """Record a new token of r; stream the text that is safe to show; finish if due."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        r.generated.append(tok)
        with self._cv:
            self.tokens_generated += 1
        p = r.params
        finish = None
        if self.eos_id is not None and tok == self.eos_id:
            finish = "stop"
            text = self.tokenizer.decode(r.generated[:-1])
        else:
            text = self.tokenizer.decode(r.generated)
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
        if finish is None:
            # Hold back an incomplete UTF-8 sequence and a possible start of a stop string.
            while cut > r.emitted_chars and text[cut - 1] == "\ufffd":
                cut -= 1
            hold = 0
            for s in p.stop:
                for k in range(min(len(s) - 1, cut - r.emitted_chars), hold, -1):
                    if text[cut - k:cut] == s[:k]:
                        hold = k
                        break
            cut -= hold
        delta = text[r.emitted_chars:cut] if cut > r.emitted_chars else ""
        r.emitted_chars = max(r.emitted_chars, cut)
        if finish is not None:
            r.text = text[:cut]
            r.finish_reason = finish
            with self._cv:
                self.requests_finished += 1
            r._put(Event(delta, [tok], finish))
        else:
            r._put(Event(delta, [tok]))
