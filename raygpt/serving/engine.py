"""Continuous-batching generation engine: pure torch, no Ray (testable on its own).

One background thread owns the model and a preallocated `KVCache` with `max_slots`
slots (at most: fewer when the KV memory budget binds, see kvbudget.py). Each iteration
of its loop (`_step`)

1. admits waiting requests into free slots (a cancelled waiting request leaves the
   queue at once, see `Request.cancel`); a prompt already held by another request (the
   n choices of one request) is not prefilled again: its KV rows are copied;
2. runs ONE batched decode step (T=1) over every running request, each row at its own
   position, and samples one token per row with the row's own parameters; the sampled
   tokens (with their logprobs) are the step's one read from the device;
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

The engine is split like vLLM's: `scheduler.Scheduler` (queues, slots, prefill chunks),
`runner.ModelRunner` (the model and its KV cache), `sampler.Sampler` (logit processing,
sampling, logprobs) and `output.OutputProcessor` (detokenization, stops, events); this
module keeps the `Engine` facade (lifecycle, submit, the loop) and re-exports the names
other modules import from it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Sequence

import torch

from raygpt.model.gpt import GPT
from raygpt.serving import kvbudget
from raygpt.serving.constants import (  # noqa: F401 - re-exported
    GREEDY_EPS,
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    SEED_MAX,
    SEED_MIN,
)
from raygpt.serving.kvbudget import KVBudgetError  # noqa: F401 - re-exported
from raygpt.serving.output import OutputProcessor
from raygpt.serving.request import (  # noqa: F401 - re-exported
    Completion,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    Event,
    InvalidRequest,
    Observer,
    PromptTooLong,
    Request,
    SamplingParams,
    TokenLogprob,
    deliver,
)
from raygpt.serving.runner import ModelRunner
from raygpt.serving.sampler import Sampler, _DenseRow  # noqa: F401 - re-exported
from raygpt.serving.scheduler import Scheduler
from raygpt.serving.transfer import to_device

log = logging.getLogger("raygpt.serving.engine")


def encode_prompt(tokenizer, vocab_size: int, block_size: int, prompt: str | Sequence[int]) -> list[int]:
    """A prompt (text, or token ids) -> token ids, checked against the vocabulary and the
    context (InvalidRequest, PromptTooLong)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty", "prompt")
        ids = tokenizer.encode(prompt)  # UserError on unknown characters
    else:
        ids = [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary "
                                 f"(0..{vocab_size - 1})", "prompt")
    if not ids:
        raise InvalidRequest("prompt must not be empty", "prompt")
    if len(ids) > block_size:
        raise PromptTooLong(f"the prompt is {len(ids)} tokens long; this model's context "
                            f"(block_size) is {block_size} tokens")
    return ids


def checked_submission(encode, vocab_size: int, prompt, params: SamplingParams | None, loop):
    """What submit checks and resolves before queueing (Engine's and ProcessEngine's):
    -> (validated params, prompt ids, the caller's running event loop or None)."""
    params = params or SamplingParams()
    params.validate(vocab_size)
    ids = encode(prompt)
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    return params, ids, loop or None


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
    kv_memory_fraction / kv_memory_bytes: the KV budget (see kvbudget.py): the engine
      gets min(max_slots, what the budget has left // bytes per slot) slots (`max_slots`
      after construction), or KVBudgetError when not even one fits. The cache is freed
      (and its bytes given back) when the loop ends: close() once drained, or abort().
    """

    def __init__(self, model: GPT, tokenizer, max_slots: int = 16, max_waiting: int = 1024,
                 version: str | None = None, name: str = "engine", step_delay_s: float = 0.0,
                 step_tokens: int = 256, min_prefill_tokens: int = 32,
                 sample_mask: torch.Tensor | None = None, observer: Observer | None = None,
                 kv_memory_fraction: float | None = None, kv_memory_bytes: int | None = None):
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.tokenizer = tokenizer
        self.max_slots = self._plan_slots(model, max_slots, kv_memory_fraction, kv_memory_bytes,
                                          version or name)
        self.max_waiting = max_waiting
        self.version = version
        self.name = name
        self.step_delay_s = step_delay_s
        self.step_tokens = max(1, step_tokens)
        self.min_prefill_tokens = max(1, min_prefill_tokens)
        self.observer = observer or Observer()
        self.fault_hook: Callable[[], None] | None = None  # called each step (fault injection)
        try:
            self.runner = ModelRunner(model, self.max_slots)
        except BaseException:
            self._release_cache()
            raise
        self.model, self.cfg, self.block_size = self.runner.model, self.runner.cfg, self.runner.block_size
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.sampler = Sampler(Sampler.build_mask(
            self.cfg.vocab_size, self.device, tokenizer, getattr(self.cfg, "real_vocab_size", None),
            sample_mask))
        self.output = OutputProcessor(tokenizer, self.block_size, self.observer, self._count)
        self.eos_id = self.output.eos_id
        self.scheduler = Scheduler(self.max_slots, self.block_size, self.step_tokens,
                                   self.min_prefill_tokens)

        self._cv = threading.Condition()
        self._closing = False  # no new requests; finish what is admitted/waiting
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # events of the batch being sampled, delivered together (request.deliver)
        self._outbox: list | None = None
        # counters
        self.decode_steps = 0
        self.prefills = 0
        self.prefill_batches = 0
        self.prefill_tokens = 0
        self.prefix_copies = 0  # prompts copied from another slot instead of prefilled
        self.slot_moves = 0  # decoding rows moved down into a freed slot (Scheduler.compact)
        self.decode_gathers = 0  # decode steps whose rows were not consecutive slots
        self.tokens_generated = 0
        self.requests_finished = 0
        self.max_batch = 0
        self.failed_steps = 0
        self.consecutive_failed_steps = 0

    def _plan_slots(self, model: GPT, max_slots: int, fraction: float | None,
                    nbytes: int | None, label: str) -> int:
        p = next(model.parameters())
        dev = kvbudget.device_key(p.device)
        self.kv_bytes_per_slot = kvbudget.kv_bytes_per_slot(model.config, p.dtype)
        self.kv_budget_bytes, what = kvbudget.resolve_budget(p.device, fraction, nbytes)
        slots, self._kv_key = kvbudget.LEDGER.reserve(
            dev, self.kv_bytes_per_slot, max_slots, self.kv_budget_bytes, what,
            f"model {label!r}", self)
        self._kv_device = dev
        return slots

    def _release_cache(self) -> None:
        """Drop the KV cache and give its bytes back to the budget (idempotent)."""
        runner = getattr(self, "runner", None)
        if runner is not None and runner.cache is not None:
            runner.cache = None
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
        kvbudget.LEDGER.release(self._kv_device, self._kv_key)

    @property
    def cache(self):
        return self.runner.cache

    def _count(self, tokens: int, finished: int) -> None:
        with self._cv:
            self.tokens_generated += tokens
            self.requests_finished += finished

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
        if self._thread is None:
            self._release_cache()  # never started: nothing to drain
        elif wait:
            self._thread.join(timeout)

    def abort(self) -> None:
        """Stop now: every unfinished request ends with finish_reason "cancelled"."""
        with self._cv:
            self._closing = True
            s = self.scheduler
            for r in s.waiting + s.prefilling + s.active:
                r.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._release_cache()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        with self._cv:
            return not self.scheduler.busy

    def stats(self) -> dict[str, Any]:
        with self._cv:
            s = self.scheduler
            return {
                "version": self.version,
                "decode_steps": self.decode_steps,
                "prefills": self.prefills,
                "prefill_batches": self.prefill_batches,
                "prefill_tokens": self.prefill_tokens,
                "prefix_copies": self.prefix_copies,
                "slot_moves": self.slot_moves,
                "decode_gathers": self.decode_gathers,
                "tokens_generated": self.tokens_generated,
                "requests_finished": self.requests_finished,
                "max_batch": self.max_batch,
                "active": len(s.active) + len(s.prefilling),
                "waiting": len(s.waiting),
                "max_slots": self.max_slots,
                "kv_cache_bytes": self.max_slots * self.kv_bytes_per_slot,
                "kv_budget_bytes": self.kv_budget_bytes,
                "failed_steps": self.failed_steps,
                "consecutive_failed_steps": self.consecutive_failed_steps,
                "closing": self._closing,
            }

    # ------------------------------------------------------------ submit

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.cfg.vocab_size, self.block_size, prompt)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               loop: asyncio.AbstractEventLoop | None | bool = None) -> Request:
        """Queue a request. Called inside a running event loop (or with loop=<a loop>), the
        request streams through an asyncio.Queue of that loop (use `aevents()`/`aresult()`);
        otherwise (or with loop=False) through a queue.Queue (`events()`/`result()`)."""
        params, ids, loop = checked_submission(self.encode, self.cfg.vocab_size, prompt, params, loop)
        req = Request(ids, params, loop, engine=self)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(int(params.seed))
        with self._cv:
            if self._closing:
                raise EngineClosed(f"engine {self.name} is not accepting requests")
            if len(self.scheduler.waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self.scheduler.waiting)} requests are already waiting "
                                       "for a slot")
            self.scheduler.waiting.append(req)
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return req

    def _drop_waiting(self, r: Request) -> None:
        with self._cv:
            if r in self.scheduler.waiting:
                self.scheduler.waiting.remove(r)
                r._put(Event(finish_reason="cancelled"))

    def generate(self, prompt, params: SamplingParams | None = None,
                 timeout: float | None = None) -> Completion:
        """Blocking convenience (not from inside an event loop's thread)."""
        return self.submit(prompt, params, loop=False).result(timeout)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        s = self.scheduler
        try:
            while True:
                with self._cv:
                    while not (s.busy or self._closing):
                        self._cv.wait()
                    if self._closing and not s.busy:
                        break
                    copies = s.admit()
                self._copy_prompts(copies)
                self._step()
                if self.step_delay_s:
                    time.sleep(self.step_delay_s)
        finally:
            with self._cv:
                for r in s.waiting + s.prefilling + s.active:
                    if not r.done:
                        r._put(Event(finish_reason="cancelled"))
                s.waiting, s.prefilling, s.active = [], [], []
            self._release_cache()  # a retired model's memory goes back now, not at GC
            self._stopped.set()

    def _fail(self, reqs: list[Request], e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}"
        for r in reqs:
            if not r.done:
                r._put(Event(finish_reason="error", error=msg))

    @torch.inference_mode()
    def _copy_prompts(self, reqs: list[Request]) -> None:
        """Newcomers whose prompt another request holds: its KV rows but the last (which
        is prefilled, giving the first token's logits)."""
        for r in reqs:
            src, n = r.copy_from
            r.copy_from = None
            try:
                self.runner.copy_prefix(src, r.slot, n)
            except Exception as e:  # noqa: BLE001 - a device error: prefill it instead
                log.warning("KV copy failed (prefilling instead): %s", e)
                continue
            r.prefilled = n
            with self._cv:
                self.prefix_copies += 1

    def _reap(self) -> None:
        with self._cv:
            self.scheduler.reap()

    @torch.inference_mode()
    def _step(self) -> None:
        self._reap()
        failed = False
        s = self.scheduler
        try:
            if self.fault_hook is not None:
                self.fault_hook()
        except Exception as e:  # an injected device failure: every running row fails
            log.error("engine step failed: %s", e)
            self._fail(s.active + s.prefilling, e)
            failed = True
        if not failed:
            self._compact()
            failed = self._decode() | self._prefill()
        with self._cv:
            if failed:
                self.failed_steps += 1
                self.consecutive_failed_steps += 1
            else:
                self.consecutive_failed_steps = 0
        self._reap()

    def _compact(self) -> None:
        """Decoding rows into consecutive slots (Scheduler.compact): their KV rows move."""
        with self._cv:
            moves = self.scheduler.compact()
            self.slot_moves += len(moves)
        for r, old, new in moves:
            try:  # the positions written so far (the last token's are written next step)
                self.runner.copy_prefix(old, new, len(r.prompt_ids) + len(r.generated))
            except Exception as e:  # noqa: BLE001 - a device error: this row fails alone
                log.exception("KV move failed")
                self._fail([r], e)

    def _decode(self) -> bool:
        """One decode step over all running requests. -> True when the forward failed."""
        batch = self.scheduler.decode_batch()
        if not batch:
            return False
        try:
            idx = to_device([[r.generated[-1]] for r in batch], torch.long, self.device)
            pos = [len(r.prompt_ids) + len(r.generated) - 1 for r in batch]
            logits = self.runner.forward(idx, [r.slot for r in batch], pos)[:, -1]
        except Exception as e:  # a bug or a device error: fail these rows, keep serving
            log.exception("decode step failed")
            self._fail(batch, e)
            return True
        with self._cv:
            self.decode_steps += 1
            self.max_batch = max(self.max_batch, len(batch))
            self.decode_gathers += batch[-1].slot - batch[0].slot + 1 != len(batch)
        self._sample_and_emit(logits, batch)
        return False

    def _prefill(self) -> bool:
        """Prefill chunks within the step's remaining token budget. -> True on a failure."""
        failed = False
        for group in self.scheduler.groups(self.scheduler.prefill_chunks()):
            try:
                self._prefill_group(group)
            except Exception as e:
                log.exception("prefill failed")
                self._fail([r for r, _ in group], e)
                failed = True
        return failed

    def _prefill_group(self, group: list[tuple[Request, int]]) -> None:
        T = max(n for _, n in group)
        ids = torch.zeros((len(group), T), dtype=torch.long)
        for i, (r, n) in enumerate(group):
            ids[i, :n] = torch.tensor(r.prompt_ids[r.prefilled:r.prefilled + n], dtype=torch.long)
        full = group[0][0].prompt_logprobs is not None  # such a row is alone in its group
        last = None if full else [n - 1 for _, n in group]
        logits = self.runner.forward(to_device(ids, torch.long, self.device), [r.slot for r, _ in group],
                                     [r.prefilled for r, _ in group], last)
        if full:
            self.sampler.record_prompt_logprobs(group[0][0], logits[0, :group[0][1]])
        with self._cv:
            self.prefill_batches += 1
            self.prefill_tokens += sum(n for _, n in group)
        done: list[tuple[Request, int]] = []  # (request, its logits row)
        for i, (r, n) in enumerate(group):
            r.prefilled += n
            if r.prefilled == len(r.prompt_ids):
                done.append((r, i if not full else n - 1))
        if not done:
            return
        with self._cv:
            self.prefills += len(done)
            for r, _ in done:
                self.scheduler.prefilling.remove(r)
            # the same prompt, prefilled once: followers copy the rows, share the logits
            followers = [(f, row, r.slot) for r, row in done for f in self.scheduler.followers_done(r)]
            self.prefix_copies += len(followers)
            done += [(f, row) for f, row, _ in followers]
            # active from now on, so that the reap frees the slot of any that ends below
            # (an echo-only request, a failed copy or sample)
            self.scheduler.active.extend(r for r, _ in done)
        try:
            for f, _, src in followers:
                self.runner.copy_prefix(src, f.slot, len(f.prompt_ids))
        except Exception as e:  # a device error: the followers fail, their source goes on
            log.exception("KV copy failed")
            self._fail([f for f, _, _ in followers], e)
        sampled, rows = [], []
        for r, row in done:
            if r.done:
                continue
            if r.params.max_tokens == 0:  # echo only: score the prompt, generate nothing
                self.output.finish_without_tokens(r)
            else:
                sampled.append(r)
                rows.append(row)
        if sampled:
            idx = to_device(rows, torch.long, self.device)
            last_logits = logits[idx, 0] if not full else logits[0, idx]
            self._sample_and_emit(last_logits, sampled)

    # ------------------------------------------------------------ sampling and output

    def outbox(self) -> list | None:
        """Where Request._put collects events while this engine's thread samples a batch
        (None elsewhere: other threads' events go out at once)."""
        if self._outbox is not None and threading.current_thread() is self._thread:
            return self._outbox
        return None

    def _sample_and_emit(self, raw: torch.Tensor, reqs: list[Request]) -> None:
        """Sample one token per row (the step's one device->host read, see Sampler.step);
        a row whose sampling fails ends with an error alone. The batch's events go to the
        event loops together (request.deliver)."""
        self._outbox = []
        try:
            toks, lps = self.sampler.step(raw, reqs, self._fail)
            for r, t, lp in zip(reqs, toks, lps):
                if t is None or r.done:
                    continue
                try:
                    self.output.emit(r, t, lp)
                except Exception as e:  # e.g. a token the tokenizer cannot decode
                    log.exception("emit failed")
                    self._fail([r], e)
        finally:
            out, self._outbox = self._outbox, None
            deliver(out)
