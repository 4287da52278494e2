"""Limits that hold and secrets that stay secret (issue 27), over real HTTP on real Serve.

First `raygpt serve --address` joins the test's Ray as a process (its API key must not
show in `serve status` nor the dashboard's Serve API); then one app, `lim`, with API keys
in Ray's KV store (one key per test: buckets are per key), a token rate limit, a
per-client concurrency cap, a short body timeout and slow engine steps (requests that
stay in flight long enough to disconnect from)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_serve, tiny_model_dir, wait_for, wait_serve_apps, wait_serve_healthy

pytestmark = pytest.mark.slow

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
KEYS = {"cost": "k-cost", "conc": "k-conc", "body": "k-body", "cancel0": "k-cancel0",
        "cancel1": "k-cancel1", "admin": "k-admin", "itl0": "k-itl0", "itl1": "k-itl1",
        "bias": "k-bias"}
STEP_S = 0.2  # engine step delay: a 60-token request runs ~12 s
VOCAB = 50304  # the model's vocabulary, padded to GPT-2's: a full-vocabulary bias is ~740 KB


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("limits"), TEXT, vocab_size=VOCAB))


def _ray_addresses(ray_session):
    ctx = ray_session.init(ignore_reinit_error=True)
    info = ctx.address_info
    return info["address"], f"http://{info['webui_url']}"


def test_api_key_not_in_serve_status_nor_config(ray_session, model_dir):
    """`raygpt serve --address --api-key-env` put the key into the deployment's
    runtime_env, which `serve status` and the dashboard's Serve API return."""
    address, dashboard = _ray_addresses(ray_session)
    secret = "sk-never-in-config-5f1e"
    port = free_port()
    env = {**os.environ, "RAYGPT_LIMITS_KEY": secret,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    proc, out = start_serve(
        [model_dir, "--port", str(port), "--address", address, "--api-key-env", "RAYGPT_LIMITS_KEY",
         "--num-cpus", "0.25", "--drain-timeout", "5"], env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_serve_healthy(proc, out, base)
        auth = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=auth, timeout=30).status_code == 200
        for path in ("/metrics", "/docs", "/openapi.json"):  # behind the key too
            assert httpx.get(f"{base}{path}", timeout=30).status_code == 401, path
            assert httpx.get(f"{base}{path}", headers=auth, timeout=30).status_code == 200, path
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")  # the venv's, activated or not
        status = subprocess.run([serve_cli, "status", "--address", dashboard], env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "raygpt" in status.stdout, status.stderr
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        # what the dashboard's Serve API answers (the client adds Ray's auth token)
        details = json.dumps(ServeSubmissionClient(dashboard).get_serve_details(), default=str)
        # the deployment's options are there (where the old runtime_env env var was)
        assert '"ray_actor_options"' in details and '"num_cpus": 0.25' in details
        for shown in (status.stdout + status.stderr, details):
            assert secret not in shown
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, "".join(out)[-3000:]


@pytest.fixture(scope="module")
def lim(ray_session, model_dir):
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from raygpt.serving.commands import key_args

    os.environ["RAYGPT_LIMITS_KEYS"] = ",".join(KEYS.values())
    common = {"model_dir": model_dir, "max_slots": 16, "max_concurrent_per_client": 2,
              "body_timeout_s": 2}

    def app(name, **args):
        args = {**common, **args, **key_args("RAYGPT_LIMITS_KEYS", "cluster", app=name)}
        return {"name": name, "route_prefix": f"/{name}", "args": args,
                "import_path": "raygpt.serving.app:build_app",
                "deployments": [{"name": "GPTServer", "ray_actor_options": {"num_cpus": 0.25}}]}

    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    # lim: a token rate limit; slow: engine steps slow enough to hold requests open
    cfg = {"http_options": http, "applications": [
        app("lim", rate_limit_tps=10, rate_limit_token_burst=20),
        app("slow", step_delay_s=STEP_S)]}
    try:
        serve_start(http_options=http).deploy_apps(ServeDeploySchema.model_validate(cfg))
        wait_serve_apps(("lim", "slow"), timeout=240)
        yield port
    finally:
        serve.shutdown()


def client(port, key, app="lim", **kw):
    return httpx.Client(base_url=f"http://127.0.0.1:{port}/{app}", timeout=60,
                        headers={"Authorization": f"Bearer {KEYS[key]}"}, **kw)


def test_cost_above_burst_is_charged_in_full(lim):
    """rate 10 tokens/s, burst 20; 1 + 16 x 6 = 97 tokens a request. The old charge
    (min(cost, burst)) let the next one through after 2 s, 5x the rate; now the next
    waits until the debt is paid: 97 / 10 = 9.7 s."""
    body = {"prompt": "a", "max_tokens": 6, "n": 16, "temperature": 0}
    with client(lim, "cost") as h:
        t0 = time.monotonic()
        first = h.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        second = h.post("/v1/completions", json=body)
        err = second.json()["error"]
        assert second.status_code == 429 and err["type"] == "tokens", second.text
        assert "10 tokens/s" in err["message"] and "97" in err["message"]
        assert int(second.headers["retry-after"]) >= 9.7 - (time.monotonic() - t0)
        # still refused where the old bucket had refilled (2 s after the first)
        wait_for(lambda: time.monotonic() - t0 > 3, 10, "3 s passed", interval=0.1)
        assert h.post("/v1/completions", json=body).status_code == 429


def _stream_until_first_chunk(port, key):
    """A ~12 s streaming request left open once its first chunk is in: (client, response,
    its line iterator: dropping that iterator would close the connection)."""
    c = client(port, key, "slow")
    r = c.send(c.build_request("POST", "/v1/completions", json={
        "prompt": "a", "max_tokens": 60, "stream": True}), stream=True)
    assert r.status_code == 200, r.read()
    lines = r.iter_lines()
    next(lines)
    return c, r, lines


def test_concurrency_cap_per_client(lim):
    held = [_stream_until_first_chunk(lim, "conc") for _ in range(2)]
    try:
        with client(lim, "conc", "slow") as h:
            r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_concurrent_requests"
        with client(lim, "admin", "slow") as other:  # another client is not affected
            r = other.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
            assert r.status_code == 200, r.text
    finally:
        for c, r, _ in held:  # hanging up ends them (and releases their slots)
            r.close()
            c.close()
    with client(lim, "conc", "slow") as h:
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
        assert r.status_code == 200, r.text


def test_slow_body_upload_gets_408(lim):
    """Headers and half the body, then nothing: 408 after body_timeout_s (2 s) instead
    of holding the request (and its client's concurrency slot) forever."""
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    socks = []
    for _ in range(2):  # two stalled uploads: the client's concurrency cap (2) is taken
        s = socket.create_connection(("127.0.0.1", lim), timeout=60)
        s.sendall(b"POST /lim/v1/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer " + KEYS["body"].encode() + b"\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
        socks.append(s)
    for s in socks:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, f"connection closed without a response: {head!r}"
            head += chunk
        s.close()
        assert head.startswith(b"HTTP/1.1 408"), head[:200]
        assert b"body_timeout_s" in head or b"408" in head
    with client(lim, "body") as h:  # the slots were released
        r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def _stats(port):
    with client(port, "admin", "slow") as h:
        return h.get("/v1/stats").json()


def test_cancelled_request_frees_its_slot(lim):
    """A client that hangs up on a stream: the engine request is cancelled and its slot
    freed long before its 60 tokens (~12 s) would have ended it."""
    for key in ("cancel0", "cancel1"):
        before = _stats(lim)["totals"]
        c, r, _ = _stream_until_first_chunk(lim, key)
        assert _stats(lim)["current"]["active"] >= 1
        r.close()
        c.close()
        t0 = time.monotonic()

        def freed():
            st = _stats(lim)
            return st["current"]["active"] == 0 and st["current"]["waiting"] == 0 and st["totals"]

        after = wait_for(freed, 60, lambda: f"the slot freed: {_stats(lim)}")
        assert time.monotonic() - t0 < 8, "the slot was held until the request ran out"
        assert after["tokens_generated"] - before["tokens_generated"] < 60


async def _stream_stamps(port, key, stamps: list[float], max_tokens: int):
    """A greedy stream on the slow app; the arrival time of each token's chunk -> stamps."""
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/slow", timeout=120,
                                 headers={"Authorization": f"Bearer {KEYS[key]}"}) as c:
        body = {"prompt": "a", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())


def _p99(gaps: list[float]) -> float:
    gaps = sorted(gaps)
    return gaps[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))]


def test_full_vocabulary_logit_bias_does_not_slow_other_streams(lim):
    """Four streams decode; once each has 12 tokens, a streamed request biasing every one
    of the model's 50304 ids (n=8, a 740 KB body) runs beside them. The streams'
    inter-token latency p99 while it decodes (from its first token to its last) stays
    within 20% of their p99 before and after it, in the same test. Rebuilding the bias
    from the dict for every row at every step (the old path) made each step ~150 ms longer
    here (+75%). Its admission (reading, parsing and validating the 740 KB body once) is
    not a decode step: on a loaded 2-core CI machine it once stretched one gap to 448 ms
    (p99 over the whole request's span), which said nothing about the per-step cost."""
    import asyncio

    import httpx

    bias = {str(t): -1.0 for t in range(VOCAB)}

    async def biased(chunks: list[tuple[float, dict]]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{lim}/slow", timeout=120,
                                     headers={"Authorization": f"Bearer {KEYS['bias']}"}) as c:
            body = {"prompt": "a", "max_tokens": 16, "n": 8, "temperature": 0.8, "ignore_eos": True,
                    "logit_bias": bias, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks.append((time.monotonic(), json.loads(line[6:])))

    async def main():
        stamps = [[] for _ in range(4)]
        streams = [asyncio.create_task(_stream_stamps(lim, f"itl{i % 2}", stamps[i], 60))
                   for i in range(4)]
        while min(map(len, stamps)) < 12:  # the streams are decoding
            assert not any(t.done() for t in streams), [t.exception() for t in streams if t.done()]
            await asyncio.sleep(0.05)
        chunks = []
        await biased(chunks)
        await asyncio.gather(*streams)
        return stamps, chunks

    stamps, chunks = asyncio.run(main())
    tokens = [c for _, chunk in chunks for c in chunk["choices"] if c.get("text")]
    assert len(tokens) == 8 * 16 and {c["index"] for c in tokens} == set(range(8)), len(tokens)
    t0, t1 = chunks[0][0], chunks[-1][0]  # its decode: first token to last
    gaps = [(a, b, b - a) for s in stamps for a, b in zip(s, s[1:])]
    during = [g for a, b, g in gaps if t0 <= a and b <= t1]
    outside = [g for a, b, g in gaps if b < t0 or a > t1]
    assert len(during) >= 40 and len(outside) >= 40, (len(during), len(outside))
    base, biased_p99 = _p99(outside), _p99(during)
    assert biased_p99 <= 1.2 * base, f"ITL p99 {1000 * biased_p99:.0f} ms beside the bias request, " \
                                     f"{1000 * base:.0f} ms without"
