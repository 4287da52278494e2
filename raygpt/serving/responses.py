"""Engine results -> OpenAI responses (like vLLM's serving_completion/serving_chat output
side): the response envelope, choices with logprobs (completions' legacy shape with echo,
chat's message/delta + logprobs.content), usage, and the SSE stream.

A "cancelled" finish (the engine stopped under the request: a drain or a model swap) is
never sent in a 200: a whole response becomes a 503, a stream an error event.
"""
import asyncio
import json
import time
import uuid

from fastapi.responses import StreamingResponse

from raygpt.serving import adapter
from raygpt.serving.protocol import ApiError, error_body

CANCELLED = "generation was cancelled (the replica is draining or swapping models); retry"
SSE_DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(obj) + "\n\n"


def usage(n_prompt: int, n_comp: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_comp,
            "total_tokens": n_prompt + n_comp}


def response_base(chat: bool, stream: bool, model_name: str, fingerprint) -> dict:
    """The fields every response or chunk of one request shares."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else \
        "text_completion"
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
            "created": int(time.time()), "model": model_name, "system_fingerprint": fingerprint}


class ChoiceFormat:
    """Engine results -> OpenAI choices (completions' text + legacy logprobs, with echo;
    chat's message/delta + logprobs.content)."""

    def __init__(self, engine, req, chat: bool, prompts: list):
        self.tok, self.req, self.chat, self.n = engine.tokenizer, req, chat, req.n
        self.echo = (not chat) and req.echo
        self.logprobs = req.logprobs if chat else req.logprobs is not None
        self.prompts = [p if isinstance(p, str) else self.tok.decode(p) for p in prompts]
        self.streams: dict[int, adapter.LegacyLogprobs] = {}
        self.started: set[int] = set()
        self.wants_every_token = bool(self.logprobs)

    def _prompt(self, i: int) -> str:
        return self.prompts[i // self.n]

    def full(self, i: int, res) -> dict:
        if self.chat:
            c = {"index": i, "message": {"role": "assistant", "content": res.text,
                                          "refusal": None},
                 "logprobs": adapter.chat_logprobs(self.tok, res.logprobs) if self.logprobs
                 else None, "finish_reason": res.finish_reason}
            return c
        text = (self._prompt(i) if self.echo else "") + res.text
        lp = None
        if self.logprobs:
            L = adapter.LegacyLogprobs(self.tok)
            lp = L.part((res.prompt_logprobs or []) + (res.logprobs or []))
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": res.finish_reason}

    def stream_start(self, base: dict, n: int) -> list[dict]:
        if self.chat:  # the role first, like OpenAI
            return [{**base, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]} for i in range(n)]
        return []

    def delta(self, i: int, ev, r) -> dict:
        if self.chat:
            return {"index": i, "delta": {"content": ev.text} if ev.text else {},
                    "logprobs": adapter.chat_logprobs(self.tok, ev.logprobs)
                    if self.logprobs else None, "finish_reason": ev.finish_reason}
        text, entries = ev.text, list(ev.logprobs)
        if i not in self.started:
            self.started.add(i)
            if self.echo:
                text = self._prompt(i) + text
                entries = (r.prompt_logprobs or []) + entries
        lp = None
        if self.logprobs:
            L = self.streams.setdefault(i, adapter.LegacyLogprobs(self.tok))
            lp = L.part(entries)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}


def full_response(base: dict, fmt: ChoiceFormat, results: list, n_prompt: int) -> dict:
    """The whole (non-streamed) response; 503 when the engine cancelled a choice."""
    if any(res.finish_reason == "cancelled" for res in results):
        # the engine stopped under it (a drain or a model swap): not a 200
        raise ApiError(503, CANCELLED, "server_error", code="cancelled",
                       headers={"Retry-After": "1"})
    choices = [fmt.full(i, res) for i, res in enumerate(results)]
    n_comp = sum(res.completion_tokens for res in results)
    return {**base, "choices": choices, "usage": usage(n_prompt, n_comp)}


def streaming_response(reqs: list, base: dict, n_prompt: int, fmt: ChoiceFormat) -> StreamingResponse:
    return StreamingResponse(
        stream(reqs, base, n_prompt, fmt), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def stream(reqs: list, base: dict, n_prompt: int, fmt: ChoiceFormat):
    """The SSE body: the engine requests' events, interleaved as they come, one chunk per
    choice delta; usage at the end (and in every chunk with vLLM's
    continuous_usage_stats) when stream_options.include_usage; then [DONE]. Whatever
    ends the stream cancels the engine requests it leaves unfinished."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        try:
            async for ev in r.aevents():
                await q.put((i, ev))
        except BaseException as e:  # pragma: no cover - surfaced as an error event
            from raygpt.serving.engine import Event

            await q.put((i, Event(finish_reason="error", error=str(e))))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    n_comp = 0
    opts = fmt.req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(getattr(opts, "continuous_usage_stats", False))
    try:
        for c in fmt.stream_start(base, len(reqs)):
            yield sse(c)
        left = len(reqs)
        while left:
            i, ev = await q.get()
            if ev.finish_reason is not None:
                left -= 1
            n_comp += len(ev.token_ids)
            if ev.finish_reason in ("error", "cancelled"):  # never a "cancelled" finish
                why = f"generation failed: {ev.error}" if ev.finish_reason == "error" else CANCELLED
                yield sse(error_body(why, "server_error"))
                continue
            if not ev.text and ev.finish_reason is None and not fmt.wants_every_token:
                continue
            chunk = {**base, "choices": [fmt.delta(i, ev, reqs[i])]}
            if include_usage and continuous:  # vLLM's continuous_usage_stats
                chunk["usage"] = usage(n_prompt, n_comp)
            yield sse(chunk)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(n_prompt, n_comp)})
        yield SSE_DONE
    finally:
        for r in reqs:
            if not r.done:
                r.cancel()
        for t in tasks:
            t.cancel()
