"""Python SDK for a raygpt Serve endpoint (OpenAI-style /v1/completions).

    from raygpt.client import Client

    with Client("http://127.0.0.1:8000") as c:
        print(c.completions("ROMEO:", max_tokens=50, temperature=0).text)
        for piece in c.stream("JULIET:", max_tokens=50):
            print(piece, end="", flush=True)
        print(c.models()[0].version, c.health().status)

    async with AsyncClient("http://127.0.0.1:8000") as c:
        r = await c.completions("ROMEO:", max_tokens=50)
        async for piece in c.stream("JULIET:", max_tokens=50):
            ...

Retries: 503 (overloaded, or a model swap in progress), 429 (rate limited), 502/504 and
connection errors are retried up to `max_retries` times with exponential backoff
(`backoff` * 2^attempt, capped at `max_backoff`, with jitter), waiting at least what the
server's Retry-After header asks. A stream is retried only until its first byte arrived.
Other errors raise at once as APIError subclasses carrying the server's error object.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
from typing import Any, AsyncIterator, Iterator, Optional, Union

import httpx
from pydantic import BaseModel, ConfigDict

__all__ = [
    "Client", "AsyncClient", "Completion", "CompletionChunk", "Choice", "Usage", "ModelCard",
    "Health", "APIError", "APIStatusError", "APIConnectionError", "APITimeoutError",
    "BadRequestError", "AuthenticationError", "NotFoundError", "RateLimitError",
    "OverloadedError", "InternalServerError",
]

Prompt = Union[str, list[str], list[int], list[list[int]]]
RETRY_STATUS = frozenset({429, 502, 503, 504})
COMPLETIONS = "/v1/completions"


# ----------------------------------------------------------------------------- types


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Choice(_Model):
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: Any = None


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(_Model):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    system_fingerprint: Optional[str] = None  # the served model's version
    choices: list[Choice]
    usage: Optional[Usage] = None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text if self.choices else ""


class CompletionChunk(Completion):
    """One server-sent event of a streamed completion (choices hold the new text)."""


class ModelCard(_Model):
    id: str
    object: str = "model"
    owned_by: Optional[str] = None
    created: Optional[int] = None
    version: Optional[str] = None
    model_dir: Optional[str] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    last_update_error: Optional[dict] = None


class Health(_Model):
    status: str
    version: Optional[str] = None
    model: Optional[str] = None
    error: Optional[str] = None


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str, *, status_code: int | None = None, body: Any = None,
                 type: str | None = None, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.status_code, self.body = message, status_code, body
        self.type, self.code, self.param, self.retry_after = type, code, param, retry_after


class APIConnectionError(APIError):
    """The server could not be reached (or the connection broke)."""


class APITimeoutError(APIConnectionError):
    pass


class APIStatusError(APIError):
    """An HTTP error status with the server's error object."""


class BadRequestError(APIStatusError):  # 400, 413, 422
    pass


class AuthenticationError(APIStatusError):  # 401, 403
    pass


class NotFoundError(APIStatusError):  # 404
    pass


class RateLimitError(APIStatusError):  # 429
    pass


class OverloadedError(APIStatusError):  # 503 (after the retries)
    pass


class InternalServerError(APIStatusError):  # other 5xx
    pass


def _retry_after(headers) -> float | None:
    v = headers.get("retry-after") if headers is not None else None
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _status_error(status: int, body_text: str, headers=None) -> APIStatusError:
    body: Any = None
    message, type_, code, param = body_text[:500] or f"HTTP {status}", None, None, None
    try:
        body = json.loads(body_text)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message") or message
            type_, code, param = err.get("type"), err.get("code"), err.get("param")
        elif isinstance(body, dict) and body.get("detail"):
            message = str(body["detail"])
    except ValueError:
        pass
    cls = (BadRequestError if status in (400, 413, 422) else
           AuthenticationError if status in (401, 403) else
           NotFoundError if status == 404 else
           RateLimitError if status == 429 else
           OverloadedError if status == 503 else
           InternalServerError if status >= 500 else APIStatusError)
    return cls(f"HTTP {status}: {message}", status_code=status, body=body, type=type_, code=code,
               param=param, retry_after=_retry_after(headers))


# ----------------------------------------------------------------------------- shared logic


def _transport_error(method: str, path: str, e: httpx.TransportError, started: bool = False) -> APIError:
    """The error of an attempt that got no (complete) response."""
    if isinstance(e, httpx.TimeoutException):
        return APITimeoutError(f"stream timed out after it started: {e}" if started
                               else f"{method} {path}: timed out ({e})")
    return APIConnectionError(f"stream broke after it started: {e}" if started
                              else f"{method} {path}: {type(e).__name__}: {e}")


class _Base:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = 60.0, max_retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 8.0, max_retry_after: float = 60.0,
                 model: str | None = None, headers: dict[str, str] | None = None,
                 http_client: httpx.Client | httpx.AsyncClient | None = None):
        base_url = base_url or os.environ.get("RAYGPT_BASE_URL") or "http://127.0.0.1:8000"
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("RAYGPT_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.model = model
        self._headers = {"Accept": "application/json", "User-Agent": "raygpt-client"}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"
        self._headers.update(headers or {})
        self.retries_done = 0  # total retries this client made (observability, tests)
        self._own = http_client is None  # made here: closed here
        self._http = http_client or self._http_class(timeout=self.timeout)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * (2 ** attempt))
        d = d * (0.5 + random.random() / 2)  # jitter: [d/2, d]
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_retry_after))
        return d

    def _next_delay(self, err: APIError, attempt: int, retryable: bool = True) -> float:
        """Seconds to wait before retrying after `err`; raises it when no retry is left."""
        if not retryable or attempt >= self.max_retries:
            raise err
        self.retries_done += 1
        return self._delay(attempt, err.retry_after)

    def _body(self, prompt: Prompt, stream: bool, include_usage: bool, kw: dict) -> dict:
        body: dict = {"prompt": prompt}
        model = kw.pop("model", None) or self.model
        if model:
            body["model"] = model
        for k, v in kw.items():
            if v is not None:
                body[k] = v
        if stream:
            body["stream"] = True
            if include_usage:
                body["stream_options"] = {"include_usage": True}
        return body

    def _stream_args(self, prompt: Prompt, include_usage: bool, kw: dict) -> dict:
        """The keyword arguments of httpx's stream() for a streamed completion."""
        return {"method": "POST", "url": self.base_url + COMPLETIONS,
                "json": self._body(prompt, True, include_usage, kw),
                "headers": {**self._headers, "Accept": "text/event-stream"}}

    @staticmethod
    def _stream_status(r: httpx.Response) -> APIError:
        """The error of a stream answered with an error status (its body read): returned
        to retry when the status is one to retry, else raised."""
        err = _status_error(r.status_code, r.text, r.headers)
        if r.status_code not in RETRY_STATUS:
            raise err
        return err

    @staticmethod
    def _stream_broke(e: httpx.TransportError, started: bool) -> APIError:
        """The error of a stream whose connection failed: returned to retry before its
        first event, raised after it (what was yielded cannot be taken back)."""
        err = _transport_error("POST", COMPLETIONS, e, started)
        if started:
            raise err from None
        return err


_DONE = object()


class _Events:
    """One stream attempt's server-sent event lines -> chunks, up to [DONE]. `started`:
    an event arrived (a stream is retried only before that). An error event raises."""

    def __init__(self):
        self.started = False

    def take(self, line: str):
        """The line's chunk, None (not an event line) or _DONE."""
        if not line.startswith("data:"):
            return None
        self.started = True
        payload = line[5:].strip()
        if payload == "[DONE]":
            return _DONE
        obj = json.loads(payload)
        if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
            err = obj["error"] or {}
            raise InternalServerError(f"stream error: {err.get('message')}", status_code=200,
                                      body=obj, type=err.get("type"), code=err.get("code"))
        return CompletionChunk.model_validate(obj)

    def chunks(self, lines) -> Iterator[CompletionChunk]:
        for line in lines:
            if (chunk := self.take(line)) is _DONE:
                return
            if chunk is not None:
                yield chunk

    async def achunks(self, lines) -> AsyncIterator[CompletionChunk]:
        async for line in lines:
            if (chunk := self.take(line)) is _DONE:
                return
            if chunk is not None:
                yield chunk


def _completion_kwargs(max_tokens, temperature, top_p, top_k, n, stop, seed, model, user, extra):
    kw = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
          "n": n, "stop": stop, "seed": seed, "model": model, "user": user}
    kw.update(extra)
    return kw


# ----------------------------------------------------------------------------- sync


class Client(_Base):
    """Synchronous client. Thread-safe (one httpx.Client with a connection pool)."""

    _http_class = httpx.Client

    def close(self) -> None:
        if self._own:
            self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, json_body: dict | None = None) -> httpx.Response:
        for attempt in itertools.count():
            try:
                r = self._http.request(method, self.base_url + path, json=json_body,
                                       headers=self._headers)
            except httpx.TransportError as e:
                time.sleep(self._next_delay(_transport_error(method, path, e), attempt))
                continue
            if r.status_code < 400:
                return r
            err = _status_error(r.status_code, r.text, r.headers)
            time.sleep(self._next_delay(err, attempt, r.status_code in RETRY_STATUS))

    def completions(self, prompt: Prompt, *, max_tokens: int = 16, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, n: int | None = None,
                    stop: str | list[str] | None = None, seed: int | None = None,
                    model: str | None = None, user: str | None = None, **extra) -> Completion:
        """POST /v1/completions -> Completion (`.text` is the first choice's text)."""
        kw = _completion_kwargs(max_tokens, temperature, top_p, top_k, n, stop, seed, model, user, extra)
        r = self._request("POST", COMPLETIONS, self._body(prompt, False, False, kw))
        return Completion.model_validate(r.json())

    def stream_events(self, prompt: Prompt, *, include_usage: bool = False, max_tokens: int = 16,
                      temperature: float | None = None, top_p: float | None = None,
                      top_k: int | None = None, n: int | None = None,
                      stop: str | list[str] | None = None, seed: int | None = None,
                      model: str | None = None, user: str | None = None,
                      **extra) -> Iterator[CompletionChunk]:
        """Streamed completion: yields every server-sent chunk (the last one carries usage
        when include_usage=True)."""
        kw = _completion_kwargs(max_tokens, temperature, top_p, top_k, n, stop, seed, model, user, extra)
        args = self._stream_args(prompt, include_usage, kw)
        for attempt in itertools.count():
            events = _Events()
            try:
                with self._http.stream(**args) as r:
                    if r.status_code < 400:
                        yield from events.chunks(r.iter_lines())
                        return
                    r.read()
                    err = self._stream_status(r)
            except httpx.TransportError as e:
                err = self._stream_broke(e, events.started)
            time.sleep(self._next_delay(err, attempt))

    def stream(self, prompt: Prompt, **kw) -> Iterator[str]:
        """Streamed completion: yields the text pieces as they are generated (choice 0)."""
        for chunk in self.stream_events(prompt, **kw):
            for ch in chunk.choices:
                if ch.index == 0 and ch.text:
                    yield ch.text

    def models(self) -> list[ModelCard]:
        r = self._request("GET", "/v1/models")
        return [ModelCard.model_validate(m) for m in r.json().get("data", [])]

    def health(self) -> Health:
        """GET /healthz (a 503 'unavailable' is retried, then raised as OverloadedError)."""
        return Health.model_validate(self._request("GET", "/healthz").json())


# ----------------------------------------------------------------------------- async


class AsyncClient(_Base):
    """asyncio client with the same methods (coroutines; `stream` is an async iterator)."""

    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def _request(self, method: str, path: str, json_body: dict | None = None) -> httpx.Response:
        for attempt in itertools.count():
            try:
                r = await self._http.request(method, self.base_url + path, json=json_body,
                                             headers=self._headers)
            except httpx.TransportError as e:
                await asyncio.sleep(self._next_delay(_transport_error(method, path, e), attempt))
                continue
            if r.status_code < 400:
                return r
            err = _status_error(r.status_code, r.text, r.headers)
            await asyncio.sleep(self._next_delay(err, attempt, r.status_code in RETRY_STATUS))

    async def completions(self, prompt: Prompt, *, max_tokens: int = 16,
                          temperature: float | None = None, top_p: float | None = None,
                          top_k: int | None = None, n: int | None = None,
                          stop: str | list[str] | None = None, seed: int | None = None,
                          model: str | None = None, user: str | None = None, **extra) -> Completion:
        kw = _completion_kwargs(max_tokens, temperature, top_p, top_k, n, stop, seed, model, user, extra)
        r = await self._request("POST", COMPLETIONS, self._body(prompt, False, False, kw))
        return Completion.model_validate(r.json())

    async def stream_events(self, prompt: Prompt, *, include_usage: bool = False,
                            max_tokens: int = 16, temperature: float | None = None,
                            top_p: float | None = None, top_k: int | None = None,
                            n: int | None = None, stop: str | list[str] | None = None,
                            seed: int | None = None, model: str | None = None,
                            user: str | None = None, **extra) -> AsyncIterator[CompletionChunk]:
        kw = _completion_kwargs(max_tokens, temperature, top_p, top_k, n, stop, seed, model, user, extra)
        args = self._stream_args(prompt, include_usage, kw)
        for attempt in itertools.count():
            events = _Events()
            try:
                async with self._http.stream(**args) as r:
                    if r.status_code < 400:
                        async for chunk in events.achunks(r.aiter_lines()):
                            yield chunk
                        return
                    await r.aread()
                    err = self._stream_status(r)
            except httpx.TransportError as e:
                err = self._stream_broke(e, events.started)
            await asyncio.sleep(self._next_delay(err, attempt))

    async def stream(self, prompt: Prompt, **kw) -> AsyncIterator[str]:
        async for chunk in self.stream_events(prompt, **kw):
            for ch in chunk.choices:
                if ch.index == 0 and ch.text:
                    yield ch.text

    async def models(self) -> list[ModelCard]:
        r = await self._request("GET", "/v1/models")
        return [ModelCard.model_validate(m) for m in r.json().get("data", [])]

    async def health(self) -> Health:
        return Health.model_validate((await self._request("GET", "/healthz")).json())
