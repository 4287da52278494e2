"""raygpt.client against a tiny stdlib HTTP server on 127.0.0.1 that answers 503 +
Retry-After a set number of times before a canned answer (the retry logic only; the
client against real Serve is tests/integration/test_client_serve.py)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from raygpt.client import (APIConnectionError, AsyncClient, AuthenticationError, BadRequestError,
                           Client, OverloadedError)

COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "raygpt",
              "system_fingerprint": "abc123", "choices": [
                  {"index": 0, "text": "hello", "logprobs": None, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}


class Fake:
    def __init__(self):
        self.fail_left = 0          # 503s still to send
        self.retry_after = "1"
        self.status = 503
        self.hits: list[tuple[float, str, dict]] = []

    def handler(self):
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json", headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _common(self, body):
                fake.hits.append((time.monotonic(), self.path, body, dict(self.headers)))
                if fake.fail_left > 0:
                    fake.fail_left -= 1
                    h = {"Retry-After": fake.retry_after} if fake.retry_after else {}
                    self._send(fake.status, {"error": {"message": "overloaded", "type": "server_error",
                                                       "param": None, "code": "overloaded"}}, headers=h)
                    return True
                return False

            def do_GET(self):
                if self._common(None):
                    return
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "raygpt", "object": "model",
                                                                 "version": "abc123", "model_dir": "/m"}]})
                elif self.path == "/healthz":
                    self._send(200, {"status": "ok", "version": "abc123", "model": "raygpt"})
                else:
                    self._send(404, {"error": {"message": "no route", "type": "invalid_request_error",
                                               "param": None, "code": "not_found"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if self._common(body):
                    return
                if self.headers.get("Authorization") == "Bearer bad":
                    self._send(401, {"error": {"message": "invalid key", "type": "invalid_request_error",
                                               "param": None, "code": "invalid_api_key"}})
                    return
                if body.get("max_tokens", 1) < 1:
                    self._send(400, {"error": {"message": "max_tokens: too small", "type": "invalid_request_error",
                                               "param": "max_tokens", "code": None}})
                    return
                if body.get("stream"):
                    events = []
                    for piece in ("hel", "lo"):
                        events.append({**COMPLETION, "choices": [
                            {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}],
                            "usage": None})
                    events[-1]["choices"][0]["finish_reason"] = "length"
                    raw = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                    self._send(200, raw.encode(), ctype="text/event-stream")
                    return
                self._send(200, COMPLETION)

        return H


@pytest.fixture
def fake():
    f = Fake()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), f.handler())
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    f.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield f
    srv.shutdown()
    srv.server_close()


def _gaps(hits):
    return [b[0] - a[0] for a, b in zip(hits, hits[1:])]


def test_503_retried_honoring_retry_after(fake):
    fake.fail_left, fake.retry_after = 2, "1"
    with Client(fake.url, max_retries=3, backoff=0.01) as c:
        t0 = time.monotonic()
        r = c.completions("hi", max_tokens=5, temperature=0)
        took = time.monotonic() - t0
    assert r.text == "hello" and r.usage.completion_tokens == 5 and r.system_fingerprint == "abc123"
    assert len(fake.hits) == 3 and c.retries_done == 2
    assert all(g >= 0.95 for g in _gaps(fake.hits)), _gaps(fake.hits)  # waited Retry-After
    assert took < 5
    assert fake.hits[-1][2] == {"prompt": "hi", "max_tokens": 5, "temperature": 0}


def test_503_exponential_backoff_without_retry_after(fake):
    fake.fail_left, fake.retry_after = 3, None
    with Client(fake.url, max_retries=3, backoff=0.2, max_backoff=5) as c:
        assert c.health().status == "ok"
    gaps = _gaps(fake.hits)
    assert len(gaps) == 3
    # jittered in [d/2, d] with d = 0.2, 0.4, 0.8
    for g, d in zip(gaps, (0.2, 0.4, 0.8)):
        assert d / 2 - 0.02 <= g <= d + 0.3, gaps


def test_503_gives_up_after_max_retries(fake):
    fake.fail_left = 10
    with Client(fake.url, max_retries=2, backoff=0.01, max_retry_after=0.05) as c:
        with pytest.raises(OverloadedError) as ei:
            c.completions("hi")
    assert ei.value.status_code == 503 and ei.value.code == "overloaded" and ei.value.retry_after == 1
    assert len(fake.hits) == 3


def test_stream_retries_503_then_yields_pieces(fake):
    fake.fail_left, fake.retry_after = 1, "0"
    with Client(fake.url, backoff=0.01) as c:
        assert list(c.stream("hi", max_tokens=5)) == ["hel", "lo"]
        events = list(c.stream_events("hi", max_tokens=5))
    assert [e.choices[0].finish_reason for e in events] == [None, "length"]
    assert fake.hits[-1][2]["stream"] is True


def test_errors_are_not_retried(fake):
    with Client(fake.url, backoff=0.01) as c:
        with pytest.raises(BadRequestError) as ei:
            c.completions("hi", max_tokens=0)
        assert ei.value.param == "max_tokens" and ei.value.status_code == 400
    assert len(fake.hits) == 1
    with Client(fake.url, api_key="bad") as c:
        with pytest.raises(AuthenticationError):
            c.completions("hi")
    assert fake.hits[-1][3]["Authorization"] == "Bearer bad"


def test_connection_error_retried_then_raised():
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, max_retries=2, backoff=0.01) as c:
        with pytest.raises(APIConnectionError):
            c.models()
        assert c.retries_done == 2


def test_async_client(fake):
    fake.fail_left, fake.retry_after = 1, "0"

    async def main():
        async with AsyncClient(fake.url, backoff=0.01) as c:
            r = await c.completions("hi", max_tokens=5)
            pieces = [p async for p in c.stream("hi", max_tokens=5)]
            (card,) = await c.models()
            h = await c.health()
            return r, pieces, card, h, c.retries_done

    r, pieces, card, h, retries = asyncio.run(main())
    assert r.text == "hello" and pieces == ["hel", "lo"]
    assert card.version == "abc123" and h.status == "ok" and retries == 1


class _BreaksAfterOneEvent(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An event stream whose connection breaks after its first event."""

    EVENT = f"data: {json.dumps({**COMPLETION, 'choices': [{'index': 0, 'text': 'hel'}]})}\n\n".encode()

    def __iter__(self):
        yield self.EVENT
        raise httpx.ReadError("connection reset")

    async def __aiter__(self):
        yield self.EVENT
        raise httpx.ReadError("connection reset")


def _stream_server(calls: list):
    """1st request: refused; 2nd: one event, then the connection breaks; then 400."""
    def handle(request):
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        if len(calls) == 2:
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  stream=_BreaksAfterOneEvent())
        return httpx.Response(400, json={"error": {"message": "bad prompt", "type": "invalid_request_error"}})
    return httpx.MockTransport(handle)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_stream_retried_before_its_first_event_not_after(kind):
    """Refused: retried. Broken after an event was yielded: raised, not retried (the
    caller has the piece). An error status not to retry: raised at once."""
    calls: list = []
    if kind == "sync":
        def run():
            got = []
            with Client("http://x", backoff=0.01, http_client=httpx.Client(transport=_stream_server(calls))) as c:
                with pytest.raises(APIConnectionError, match="stream broke after it started") as broke:
                    for piece in c.stream("hi"):
                        got.append(piece)
                with pytest.raises(BadRequestError, match="bad prompt"):
                    list(c.stream("hi"))
                return got, broke, c.retries_done
    else:
        def run():
            async def main():
                got = []
                async with AsyncClient("http://x", backoff=0.01,
                                       http_client=httpx.AsyncClient(transport=_stream_server(calls))) as c:
                    with pytest.raises(APIConnectionError, match="stream broke after it started") as broke:
                        async for piece in c.stream("hi"):
                            got.append(piece)
                    with pytest.raises(BadRequestError, match="bad prompt"):
                        [p async for p in c.stream("hi")]
                    return got, broke, c.retries_done
            return asyncio.run(main())
    got, broke, retries = run()
    assert got == ["hel"] and retries == 1 and len(calls) == 3
