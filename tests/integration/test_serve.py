"""Ray Serve hosting, end to end over HTTP on 127.0.0.1 (CPU, a tiny exported model).

One Serve instance for the module; four applications deployed together with one
declarative config (the `serve deploy` REST API), each on its own route prefix:
  /main   the API (64 slots)            /over   tiny limits to provoke 503s
  /guard  API key, rate limit, body cap  /upd    live model updates
  /fault  engine steps that fail (the fault_file testing aid): replaced by Serve
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
import torch


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n"
        "All:\nSpeak, speak.\nROMEO: JULIET? What light through yonder window breaks!\n")
BLOCK = 64
API_KEY = "s3cret-test-key"
API_KEYS = (API_KEY, "second-key", "third-key")
APPS = ("main", "over", "guard", "upd", "fault", "proc")


# ----------------------------------------------------------------------------- fixtures

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(out: Path, tok_path: Path, seed: int, vocab: int) -> str:
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab))
    save_model_dir(m, out, tok_path)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from raygpt.data.tokenizer import train_char_tokenizer

    d = tmp_path_factory.mktemp("serve-models")
    tok = train_char_tokenizer(TEXT)
    tok_path = tok.save(d / "tokenizer.json")
    a = _export(d / "model-a", tok_path, 0, tok.vocab_size)
    b = _export(d / "model-b", tok_path, 1, tok.vocab_size)
    broken = d / "model-broken"
    shutil.copytree(a, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    return {"a": a, "b": b, "broken": str(broken), "tok": tok,
            "chat_probe": _chat_probe_template(d, a)}


CHAT_PROBE = [{"role": "user", "content": "hear me"}]


def _chat_probe_template(d: Path, model_dir: str) -> dict:
    """The default chat template with another stop: two characters from the middle of
    model a's greedy reply to CHAT_PROBE (a random model never writes the default's
    "\nUser:"), so a test can see whether the template's stop is applied."""
    from raygpt.model.chat import ChatTemplate

    reply = Ref(model_dir).greedy(ChatTemplate().render(CHAT_PROBE), 16)
    stop = reply[len(reply) // 2:][:2]
    path = d / "chat-probe-template.json"
    path.write_text(json.dumps(ChatTemplate(stop=[stop]).to_dict()))
    return {"path": str(path), "reply": reply, "stop": stop}


class Ref:
    """Greedy reference outputs (what `raygpt generate --temperature 0` prints)."""

    def __init__(self, model_dir):
        from raygpt.data.tokenizer import load_tokenizer
        from raygpt.model.io import load_model_dir

        self.model, self.meta = load_model_dir(model_dir)
        self.model_dir = model_dir
        self.tok = load_tokenizer(Path(model_dir) / "tokenizer.json")
        self.version = self.meta["version"]
        self._cache = {}

    def greedy(self, prompt: str, n: int) -> str:
        key = (prompt, n)
        if key not in self._cache:
            ids = torch.tensor([self.tok.encode(prompt)])
            out = self.model.generate(ids, n, temperature=0.0)
            self._cache[key] = self.tok.decode(out[0, ids.shape[1]:].tolist())
        return self._cache[key]


@pytest.fixture(scope="module")
def refs(models):
    return {"a": Ref(models["a"]), "b": Ref(models["b"])}


def _app(name, model_dir, args=None, deployment=None, runtime_env=None):
    app = {"name": name, "route_prefix": f"/{name}", "import_path": "raygpt.serving.app:build_app",
           "args": {"model_dir": model_dir, **(args or {})},
           "deployments": [{"name": "GPTServer", "ray_actor_options": {"num_cpus": 0.25},
                            "health_check_period_s": 2, **(deployment or {})}]}
    if runtime_env:
        app["runtime_env"] = runtime_env
    return app


class Cluster:
    def __init__(self, port, dashboard, models):
        self.port, self.dashboard, self.models = port, dashboard, models
        self.base = f"http://127.0.0.1:{port}"
        self.upd_user_config = None
        self.fault_file = str(Path(models["a"]).parent / "fault-replicas")

    def config(self):
        m = self.models
        upd_dep = {"max_ongoing_requests": 32}
        if self.upd_user_config:
            upd_dep["user_config"] = self.upd_user_config
        return {
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [
                _app("main", m["a"], {"max_slots": 64},
                     {"max_ongoing_requests": 100, "max_queued_requests": 200}),
                _app("over", m["a"], {"max_slots": 2, "step_delay_s": 0.05, "strict_requests": True,
                                      "chat_template": m["chat_probe"]["path"]},
                     {"max_ongoing_requests": 2, "max_queued_requests": 2,
                      "backpressure_config": {"status_code": 503, "retry_after_s": 2}}),
                _app("guard", m["a"], {"api_key_env": "RAYGPT_TEST_API_KEY", "rate_limit_rps": 1,
                                       "rate_limit_burst": 3, "max_body_bytes": 2048,
                                       "rate_limit_tps": 5, "rate_limit_token_burst": 100},
                     runtime_env={"env_vars": {"RAYGPT_TEST_API_KEY": ",".join(API_KEYS)}}),
                _app("upd", m["a"], {"max_slots": 16, "step_delay_s": 0.005}, upd_dep),
                _app("fault", m["a"], {"max_slots": 2, "fault_file": self.fault_file,
                                       "max_failed_steps": 2, "rate_limit_rps": 0.5,
                                       "rate_limit_burst": 40,
                                       "trusted_proxy_header": "X-Forwarded-For"},
                     {"health_check_period_s": 1, "health_check_timeout_s": 10}),
                _app("proc", m["a"], {"max_slots": 8, "engine_process": True}),
            ],
        }

    def deploy(self):
        """`serve deploy` of the whole config (PUT to the dashboard's Serve REST API)."""
        cfg = self.config()
        if self.dashboard:  # the client `serve deploy` uses (it adds Ray's auth token)
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            ServeSubmissionClient(self.dashboard).deploy_applications(cfg)
        else:  # no dashboard in this Ray session: what the REST handler calls
            from ray.serve._private.api import serve_start
            from ray.serve.schema import ServeDeploySchema

            serve_start(http_options=cfg["http_options"]).deploy_apps(
                ServeDeploySchema.model_validate(cfg))

    def wait_running(self, timeout=180):
        from conftest import wait_serve_apps

        wait_serve_apps(APPS, timeout)

    def client(self, app, **kw):
        return httpx.Client(base_url=f"{self.base}/{app}", timeout=60, **kw)


@pytest.fixture(scope="module")
def cluster(ray_session, models):
    from ray import serve

    ctx = ray_session.init(ignore_reinit_error=True)
    web = ctx.address_info.get("webui_url") if hasattr(ctx, "address_info") else None
    dashboard = f"http://{web}" if web else None
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    c = Cluster(port, dashboard, models)
    try:
        c.deploy()
        c.wait_running()
        yield c
    finally:
        serve.shutdown()


# ----------------------------------------------------------------------------- helpers

def sse_events(raw: str) -> list[str]:
    """Split an SSE body into the data payloads, checking the framing on the way."""
    assert raw.endswith("\n\n"), raw[-50:]
    out = []
    for block in raw.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        out.append(lines[0][len("data: "):])
    return out


def assert_error(r: httpx.Response, status: int, param: str | None = "?"):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "?":
        assert err["param"] == param, err
    return err


def stats(c, app="main"):
    with c.client(app) as h:
        return h.get("/v1/stats").json()["totals"]


# ----------------------------------------------------------------------------- tests

def test_completion_greedy_equals_generate(cluster, refs):
    with cluster.client("main") as h:
        body = {"model": "raygpt", "prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}
        r1, r2 = h.post("/v1/completions", json=body), h.post("/v1/completions", json=body)
    assert r1.status_code == 200, r1.text
    j = r1.json()
    assert j["object"] == "text_completion" and j["model"] == "raygpt"
    assert j["system_fingerprint"] == refs["a"].version
    (ch,) = j["choices"]
    assert ch["index"] == 0 and ch["finish_reason"] == "length"
    assert ch["text"] == refs["a"].greedy("ROMEO:", 30)
    assert j["usage"] == {"prompt_tokens": 6, "completion_tokens": 30, "total_tokens": 36}
    assert r2.json()["choices"][0]["text"] == ch["text"]  # deterministic


def test_streaming_sse(cluster, refs):
    body = {"prompt": "All:", "max_tokens": 25, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with cluster.client("main") as h, h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 25, "total_tokens": 29}
    text_chunks = chunks[:-1]
    assert len(text_chunks) > 1  # streamed, not one blob
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == refs["a"].greedy("All:", 25)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])


def _engine_processes() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"raygpt.serving.core_process import _child_entry" in cmd:
            out.append(int(pid))
    return out


def test_engine_process_streams_what_the_in_process_engine_does(cluster, refs):
    """engine_process: the engine loop in a child process of the replica (its own GIL);
    the same answers over real HTTP, streamed and whole, and its counters in /v1/stats."""
    (child,) = _engine_processes()
    body = {"prompt": "All:", "max_tokens": 25, "temperature": 0, "stream": True}
    with cluster.client("proc") as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode())
        whole = h.post("/v1/completions", json={**body, "stream": False, "logprobs": 1, "echo": True})
        stats = h.get("/v1/stats").json()
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1 and events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == refs["a"].greedy("All:", 25)
    assert whole.status_code == 200, whole.text
    ch = whole.json()["choices"][0]
    assert ch["text"] == "All:" + refs["a"].greedy("All:", 25)
    assert len(ch["logprobs"]["tokens"]) == 4 + 25  # echo: the prompt's entries came over too
    assert stats["current"]["requests_finished"] >= 2 and stats["current"]["active"] == 0
    assert _engine_processes() == [child]  # the same child served both


def test_list_prompts_n_seed_stop(cluster, refs):
    with cluster.client("main") as h:
        body = {"prompt": ["First", "hear me"], "n": 2, "max_tokens": 12, "temperature": 0.9,
                "top_p": 0.9, "seed": 7}
        j = h.post("/v1/completions", json=body).json()
        j2 = h.post("/v1/completions", json=body).json()
        assert [c["index"] for c in j["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in j["choices"]] == [c["text"] for c in j2["choices"]]  # seeded
        assert j["usage"]["prompt_tokens"] == len("First") + len("hear me")  # once per prompt
        assert j["usage"]["completion_tokens"] == 4 * 12
        # streaming with several choices: every index ends once
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(e) for e in sse_events(r.read().decode())[:-1]]
        texts = {}
        for c in chunks:
            (ch,) = c["choices"]
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        assert [texts[i] for i in range(4)] == [c["text"] for c in j["choices"]]
        # stop strings
        full = refs["a"].greedy("ROMEO:", 40)
        stop = full[15:17]
        s = h.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 40,
                                            "temperature": 0, "stop": [stop]}).json()
        assert s["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                                   "finish_reason": "stop"}
        # a prompt given as token ids
        ids = refs["a"].tok.encode("ROMEO:")
        t = h.post("/v1/completions", json={"prompt": ids, "max_tokens": 30, "temperature": 0})
        assert t.json()["choices"][0]["text"] == refs["a"].greedy("ROMEO:", 30)


def test_models_health_playground(cluster, refs):
    with cluster.client("main") as h:
        m = h.get("/v1/models").json()
        (card,) = m["data"]
        assert card["id"] == "raygpt" and card["version"] == refs["a"].version
        assert card["context_length"] == BLOCK
        # no server paths nor update errors for clients; the admin card has them
        assert "model_dir" not in card and "last_update_error" not in card
        admin = h.get("/admin/model").json()
        assert admin["model_dir"] == refs["a"].model_dir and admin["last_update_error"] is None
        assert h.get("/v1/models/raygpt").json()["version"] == refs["a"].version
        assert_error(h.get("/v1/models/nope"), 404)
        hz = h.get("/healthz")
        assert hz.status_code == 200 and hz.json()["status"] == "ok"
        page = h.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '"/main"' in page.text and "{{ROOT}}" not in page.text
        script = page.text.split("<script", 1)[1]
        assert "://" not in script and "src=" not in script  # no CDN, nothing external


BAD = [
    ("{not json", 400, None),
    ('{"prompt": "a", "unknown_field": 1, "top_k": -2}', 400, "top_k"),  # unknown ignored, known checked
    ('{"prompt": "a", "stop": "%s"}' % ("x" * 100_000), 400, "stop"),
    ('{"max_tokens": 5}', 400, "prompt"),
    ('{"prompt": "a", "max_tokens": 0}', 400, "max_tokens"),
    ('{"prompt": "a", "max_tokens": -3}', 400, "max_tokens"),
    ('{"prompt": "a", "max_tokens": 100000}', 400, "max_tokens"),
    ('{"prompt": "a", "max_tokens": "ten"}', 400, "max_tokens"),
    ('{"prompt": "a", "temperature": -0.5}', 400, "temperature"),
    ('{"prompt": "a", "top_p": 0}', 400, "top_p"),
    ('{"prompt": "a", "top_p": 1.5}', 400, "top_p"),
    ('{"prompt": "a", "n": 0}', 400, "n"),
    ('{"prompt": "a", "n": 1000}', 400, "n"),
    ('{"prompt": "a", "stop": ""}', 400, "stop"),
    ('{"prompt": "a", "stop": ["a","b","c","d","e"]}', 400, "stop"),
    ('{"prompt": "a", "stream": "yes"}', 400, "stream"),
    ('{"prompt": ""}', 400, "prompt"),
    ('{"prompt": []}', 400, "prompt"),
    ('{"prompt": ["ok", ""]}', 400, "prompt"),
    ('{"prompt": [99999]}', 400, "prompt"),
    ('{"prompt": "%s"}' % ("a" * (BLOCK + 1)), 400, "prompt"),
    ('{"prompt": "snow \\u2603 man"}', 400, "prompt"),
    ('{"prompt": "a", "model": "gpt-4"}', 404, "model"),
    ("[1, 2]", 400, None),
    ("", 400, None),
]


def test_bad_inputs_are_4xx_error_objects(cluster):
    with cluster.client("main") as h:
        for body, status, param in BAD:
            r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert_error(r, status, param)
        assert_error(h.get("/v1/completions"), 405)
        assert_error(h.get("/no/such/route"), 404)
        assert h.get("/healthz").status_code == 200  # the replica is fine
        assert h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_64_concurrent_streams_batch(cluster, refs):
    prompts = ["First", "Before we", "All:", "hear me", "Speak", "ROMEO:", "JULIET?", "What light"]
    jobs = [(prompts[i % len(prompts)], 8 + (i * 7) % 40) for i in range(64)]
    before = stats(cluster)

    async def one(client, prompt, n):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            raw = (await r.aread()).decode()
        ev = sse_events(raw)
        assert ev[-1] == "[DONE]"
        chunks = [json.loads(e) for e in ev[:-1]]
        return "".join(ch["text"] for c in chunks for ch in c["choices"]), chunks[-1]["usage"]

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=f"{cluster.base}/main", timeout=120,
                                     limits=limits) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in jobs))

    results = asyncio.run(main())
    for (p, n), (text, usage) in zip(jobs, results):
        assert text == refs["a"].greedy(p, n), (p, n)
        assert usage["completion_tokens"] == n and usage["prompt_tokens"] == len(p)
    after = stats(cluster)
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    assert tokens == sum(n for _, n in jobs)
    assert steps < tokens / 4, f"{steps} decode steps for {tokens} tokens: not batching"


def test_overload_503_with_retry_after(cluster):
    """max_ongoing 2 + max_queued 2, 16 requests at once (each ~2 s): the ones beyond the
    capacity get 503 + Retry-After, all others complete, and the service is healthy after."""
    body = {"prompt": "hear", "max_tokens": 40, "temperature": 0}

    async def main():
        async with httpx.AsyncClient(base_url=f"{cluster.base}/over", timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            # open the 16 connections first, so that the 16 requests go out together
            await asyncio.gather(*(client.get("/healthz") for _ in range(16)))
            return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                          for _ in range(16)))

    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    rejected = [r for r in rs if r.status_code == 503]
    ok = [r for r in rs if r.status_code == 200]
    assert len(rejected) + len(ok) == len(rs), codes
    # Serve takes at most max_ongoing + max_queued = 4 at a time (and may reject a few more
    # than strictly necessary when requests arrive together, see ray.serve's router); on a
    # loaded machine the 16 requests may not all arrive within one request's duration, so
    # only "some rejected, at least the queue's worth served" is exact.
    assert rejected and len(ok) >= 2, codes
    assert all(r.headers.get("retry-after") == "2" for r in rejected)
    texts = {r.json()["choices"][0]["text"] for r in ok}
    assert len(texts) == 1 and all(r.json()["usage"]["completion_tokens"] == 40 for r in ok)
    with cluster.client("over") as h:
        assert h.get("/healthz").status_code == 200
        assert h.post("/v1/completions", json={"prompt": "hear", "max_tokens": 3}).status_code == 200


def test_auth_rate_limit_body_limit(cluster):
    with cluster.client("guard") as h:
        assert h.get("/healthz").status_code == 200  # health is public
        err = assert_error(h.post("/v1/completions", json={"prompt": "a"}), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(h.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with cluster.client("guard", headers=auth) as h:
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200, r.text
        big = json.dumps({"prompt": "a", "user": "u" * 4000})
        assert_error(h.post("/v1/completions", content=big,
                            headers={"content-type": "application/json"}), 413)
        codes = [h.get("/v1/models") for _ in range(8)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        err = assert_error(limited[0], 429)
        assert err["code"] == "rate_limit_exceeded" and int(limited[0].headers["retry-after"]) >= 1
        # the bucket refills: within Retry-After (plus slack), a request passes again
        def not_limited() -> int:
            code = h.get("/v1/models").status_code
            return 0 if code == 429 else code

        code = wait_for(not_limited, int(limited[0].headers["retry-after"]) + 5, "the bucket refilled")
        assert code == 200


def test_model_update_under_load(cluster, refs, models):
    """user_config.model_dir A -> B under streaming load: no request fails, each one is
    entirely from A or entirely from B; then a broken dir is refused, B keeps serving."""
    prompt, n = "ROMEO:", 30
    expect = {refs["a"].version: refs["a"].greedy(prompt, n),
              refs["b"].version: refs["b"].greedy(prompt, n)}
    assert len(set(expect.values())) == 2
    results, errors = [], []
    stop = asyncio.Event()

    async def client_loop(client):
        while not stop.is_set():
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
            try:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    raw = (await r.aread()).decode()
                    if r.status_code != 200:
                        errors.append((r.status_code, raw))
                        continue
                ev = sse_events(raw)
                assert ev[-1] == "[DONE]"
                chunks = [json.loads(e) for e in ev[:-1]]
                fps = {c["system_fingerprint"] for c in chunks}
                text = "".join(c["choices"][0]["text"] for c in chunks)
                results.append((fps, text, chunks[-1]["choices"][0]["finish_reason"]))
            except Exception as e:  # noqa: BLE001 - every failure is a dropped request
                errors.append(repr(e))

    async def version(client):
        return (await client.get("/admin/model")).json()

    async def main():
        async with httpx.AsyncClient(base_url=f"{cluster.base}/upd", timeout=120) as client:
            loops = [asyncio.create_task(client_loop(client)) for _ in range(6)]
            t0 = time.time()
            while len(results) < 6:  # model A is serving the load
                assert time.time() - t0 < 60 and not errors, errors[:3]
                await asyncio.sleep(0.1)
            cluster.upd_user_config = {"model_dir": models["b"]}
            await asyncio.to_thread(cluster.deploy)
            t0 = time.time()
            while (await version(client))["version"] != refs["b"].version:
                assert time.time() - t0 < 120, "model B never became current"
                await asyncio.sleep(0.2)
            t0 = time.time()  # keep the load on until B has answered whole requests
            while sum(1 for fps, _, _ in results if fps == {refs["b"].version}) < 3:
                assert time.time() - t0 < 120 and not errors, ("no requests served by B", errors[:3])
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*loops)
            # a broken model dir: refused, B keeps serving, the error is reported
            cluster.upd_user_config = {"model_dir": models["broken"]}
            await asyncio.to_thread(cluster.deploy)
            t0 = time.time()
            while True:
                card = await version(client)
                if card["last_update_error"]:
                    break
                assert time.time() - t0 < 120, "the broken model dir was never tried"
                await asyncio.sleep(0.2)
            r = await client.post("/v1/completions",
                                  json={"prompt": prompt, "max_tokens": n, "temperature": 0})
            return card, r

    card, r = asyncio.run(main())
    assert not errors, errors[:3]
    by_version = {}
    for fps, text, finish in results:
        assert len(fps) == 1, fps  # never a mix of models within one request
        (fp,) = fps
        assert text == expect[fp] and finish == "length"
        by_version[fp] = by_version.get(fp, 0) + 1
    assert set(by_version) == set(expect), by_version  # traffic was served by both
    assert card["version"] == refs["b"].version
    assert card["last_update_error"]["model_dir"] == models["broken"]
    assert "model.safetensors" in card["last_update_error"]["error"]
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expect[refs["b"].version]
    from ray import serve

    assert serve.status().applications["upd"].status == "RUNNING"


# ----------------------------------------------------------------------------- issue 18

def test_tiny_temperature_is_greedy_while_another_streams(cluster, refs):
    """temperature 1e-300 was a 500 (logits / 1e-300 = inf/nan); now it is greedy, and a
    stream running beside it finishes normally."""
    async def main():
        async with httpx.AsyncClient(base_url=f"{cluster.base}/main", timeout=120) as client:
            async def stream():
                body = {"prompt": "All:", "max_tokens": 40, "temperature": 0.8, "seed": 3,
                        "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    return r.status_code, (await r.aread()).decode()
            t = asyncio.create_task(stream())
            tiny = [client.post("/v1/completions", json={
                "prompt": "ROMEO:", "max_tokens": 20, "temperature": t_}) for t_ in (1e-300, 1e-9)]
            return await asyncio.gather(*tiny), await t

    tiny, (code, raw) = asyncio.run(main())
    for r in tiny:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == refs["a"].greedy("ROMEO:", 20)
    assert code == 200
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("error" not in c for c in chunks)


def test_huge_seed_is_400_and_leaves_nothing_running(cluster):
    with cluster.client("main") as h:
        for seed in (2 ** 64, -(2 ** 63) - 1, 10 ** 30):
            body = {"prompt": ["First", "hear me"], "n": 4, "max_tokens": 60, "seed": seed}
            assert_error(h.post("/v1/completions", json=body), 400, "seed")
        # the largest valid seed; its n choices wrap around (seed + j mod 2^64)
        ok = h.post("/v1/completions", json={"prompt": "a", "n": 3, "max_tokens": 4,
                                             "seed": 2 ** 64 - 1})
        assert ok.status_code == 200, ok.text
        cur = h.get("/v1/stats").json()["current"]
    assert cur["waiting"] == 0 and cur["active"] == 0, cur


def test_openai_defaults_and_unsupported_fields(cluster, refs):
    defaults = {"prompt": "ROMEO:", "max_tokens": None, "temperature": None,
                "frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False,
                "best_of": 1, "n": None, "stop": None, "suffix": None, "top_p": None,
                "seed": None, "stream": False, "user": None, "logit_bias": None}
    with cluster.client("main") as h:
        r = h.post("/v1/completions", json=defaults)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
        for field, value in (("best_of", 2), ("suffix", "end")):
            err = assert_error(h.post("/v1/completions", json={"prompt": "a", field: value}),
                               400, field)
            assert err["code"] == "unsupported_parameter" and field in err["message"]
        for body, param in (({"prompt": "a", "logprobs": 6}, "logprobs"),
                            ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
                            ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias"),
                            ({"prompt": "a", "logit_bias": {"99999": 1}}, "logit_bias"),
                            ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
                            ({"prompt": ["a"] * 30, "n": 16}, "n")):  # fan-out
            assert_error(h.post("/v1/completions", json=body), 400, param)
        # logit_bias steers greedy decoding; penalties change a greedy output that repeats
        tok = refs["a"].tok
        e = tok.encode("e")[0]
        b = h.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5,
                                            "temperature": 0, "logit_bias": {str(e): 100}})
        assert b.json()["choices"][0]["text"] == "eeeee"
        p = h.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0,
                                            "logit_bias": {str(e): 5}, "frequency_penalty": 2,
                                            "presence_penalty": 2})
        assert p.status_code == 200 and p.json()["choices"][0]["text"] != "eeeee"


def test_logprobs_and_echo(cluster, refs):
    import math

    with cluster.client("main") as h:
        r = h.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0,
                                            "logprobs": 3}).json()
        ch = r["choices"][0]
        lp = ch["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert "".join(lp["tokens"]) == ch["text"] == refs["a"].greedy("ROMEO:", 6)
        assert lp["text_offset"] == list(range(6))
        for t, l, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert len(top) == 3 and l <= 0 and max(top.values()) == pytest.approx(l)  # greedy
            assert top[t] == pytest.approx(l)
        # echo with max_tokens 0: the prompt scored, nothing generated
        e = h.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 0, "echo": True,
                                            "logprobs": 1}).json()
        ch = e["choices"][0]
        assert ch["text"] == "ROMEO:" and e["usage"]["completion_tokens"] == 0
        lp = ch["logprobs"]
        assert lp["tokens"] == list("ROMEO:") and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and lp["text_offset"] == list(range(6))
        # the prompt's logprobs agree with the model's own forward pass
        m, tok = refs["a"].model, refs["a"].tok
        ids = torch.tensor([tok.encode("ROMEO:")])
        with torch.no_grad():
            ref = torch.log_softmax(m(ids)[0].float(), -1)
        want = [float(ref[i, ids[0, i + 1]]) for i in range(5)]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert all(math.isfinite(x) for x in lp["token_logprobs"][1:])
        # echo + generation + streaming: the chunks add up to the non-streamed answer
        body = {"prompt": "ROMEO:", "max_tokens": 5, "echo": True, "logprobs": 2,
                "temperature": 0}
        full = h.post("/v1/completions", json=body).json()["choices"][0]
        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(x) for x in sse_events(s.read().decode())[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
        toks = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
        offs = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
        assert toks == full["logprobs"]["tokens"] and offs == full["logprobs"]["text_offset"]


def test_chat_completions(cluster, refs):
    msgs = [{"role": "system", "content": "Speak."},
            {"role": "user", "content": [{"type": "text", "text": "hear me"}]}]
    prompt = "Speak.\n\nUser: hear me\nAssistant:"
    with cluster.client("main") as h:
        r = h.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 12,
                                                 "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 2, "tools": None})
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["object"] == "chat.completion"
        (ch,) = j["choices"]
        assert ch["message"]["role"] == "assistant"
        want = refs["a"].greedy(prompt, 12)
        if "\nUser:" in want:  # the template's stop string
            want = want[:want.index("\nUser:")]
        assert ch["message"]["content"] == want
        assert len(ch["logprobs"]["content"]) == j["usage"]["completion_tokens"]
        assert j["usage"]["prompt_tokens"] == len(prompt)
        with h.stream("POST", "/v1/chat/completions",
                      json={"messages": msgs, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as s:
            chunks = [json.loads(x) for x in sse_events(s.read().decode())[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
        err = assert_error(h.post("/v1/chat/completions", json={
            "messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}),
            400, "tools")
        assert err["code"] == "unsupported_parameter"
        assert_error(h.post("/v1/chat/completions", json={"messages": []}), 400, "messages")


def test_chat_template_stop_kept_beside_a_string_stop(cluster, models):
    """The template's stop applies beside the request's own, also when `stop` is one
    string containing it (the merge tested `s not in req.stop`: on a string, a substring
    test, which dropped the template's stop). The `over` app's template stops at two
    characters of model a's greedy reply."""
    probe = models["chat_probe"]
    want = probe["reply"][:probe["reply"].index(probe["stop"])]
    assert len(want) < len(probe["reply"])
    own = probe["stop"] + "~never"  # "~" is not in the vocabulary: never generated
    with cluster.client("over") as h:
        for stop in (own, [own]):
            r = h.post("/v1/chat/completions", json={"messages": CHAT_PROBE, "max_tokens": 16,
                                                     "temperature": 0, "stop": stop})
            assert r.status_code == 200, r.text
            (ch,) = r.json()["choices"]
            assert (ch["message"]["content"], ch["finish_reason"]) == (want, "stop"), (stop, ch)


def test_tokenize_detokenize_health_metrics(cluster, refs):
    with cluster.client("main") as h:
        t = h.post("/tokenize", json={"prompt": "ROMEO:", "add_special_tokens": False}).json()
        assert t["tokens"] == refs["a"].tok.encode("ROMEO:") and t["count"] == 6
        assert t["max_model_len"] == BLOCK
        assert h.post("/detokenize", json={"tokens": t["tokens"]}).json() == {"prompt": "ROMEO:"}
        assert_error(h.post("/detokenize", json={"tokens": [99999]}), 400, "tokens")
        assert h.get("/health").status_code == 200
        h.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
        m = h.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        text = m.text
        for name in ("raygpt_time_to_first_token_seconds_bucket",
                     "raygpt_inter_token_latency_seconds_bucket", "raygpt_queue_depth",
                     "raygpt_slots_in_use", "raygpt_generated_tokens_total",
                     'raygpt_requests_total{status="200"}'):
            assert name in text, name
        ttft = [ln for ln in text.splitlines()
                if ln.startswith("raygpt_time_to_first_token_seconds_count")]
        assert float(ttft[0].split()[-1]) >= 1


def test_openai_client_defaults(cluster, refs):
    """The official openai SDK with default arguments: completions with logprobs + echo,
    streaming, chat."""
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{cluster.base}/main/v1", api_key="unused", max_retries=0)
    r = c.completions.create(model="raygpt", prompt="ROMEO:", max_tokens=8, temperature=0,
                             logprobs=2, echo=True)
    ch = r.choices[0]
    assert ch.text == "ROMEO:" + refs["a"].greedy("ROMEO:", 8)
    assert len(ch.logprobs.tokens) == 6 + 8 and ch.logprobs.token_logprobs[0] is None
    assert r.usage.completion_tokens == 8
    s = c.completions.create(model="raygpt", prompt="All:", max_tokens=10, temperature=0,
                             stream=True)
    assert "".join(x.choices[0].text for x in s) == refs["a"].greedy("All:", 10)
    chat = c.chat.completions.create(model="raygpt", messages=[
        {"role": "user", "content": "hear me"}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    st = c.chat.completions.create(model="raygpt", messages=[
        {"role": "user", "content": "hear me"}], max_tokens=6, stream=True)
    assert [x.choices[0].finish_reason for x in st][-1] in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="raygpt", prompt="a", seed=2 ** 64)


def test_lm_eval_local_completions(cluster, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions model scores a small multiple-choice task
    built here (no download): loglikelihoods over HTTP via logprobs + echo, tokenization
    through the server's /tokenize (tokenizer_backend=remote)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("First", ["Citizen:", "light"], 0), ("ROMEO:", ["JULIET?", "speak"], 0),
        ("Speak,", ["speak.", "window"], 0), ("What light through", ["yonder", "me"], 0),
        ("hear me", ["speak.", "All:"], 0), ("Before we", ["proceed", "breaks"], 0)]]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "raygpt_mc.yaml").write_text(
        "task: raygpt_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    out = simple_evaluate(
        model="local-completions",
        model_args=(f"model=raygpt,base_url={cluster.base}/main/v1/completions,"
                    "tokenizer_backend=remote,num_concurrent=1,max_retries=1"),
        tasks=["raygpt_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=False)
    acc = out["results"]["raygpt_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert out["results"]["raygpt_mc"]["alias"] == "raygpt_mc"


def test_failing_engine_steps_replace_the_replica(cluster, tmp_path_factory):
    """A replica whose every engine step fails (a broken device, injected with the
    fault_file testing aid) fails its health check and Serve replaces it."""
    fault = Path(cluster.fault_file)
    with cluster.client("fault") as h:
        rid = h.get("/v1/stats").json()["replica"]
        assert h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
        fault.write_text(rid)
        codes = [h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code
                 for _ in range(3)]
        assert all(c >= 500 for c in codes), codes  # a device fault, not the client's
        def replaced() -> str | None:
            try:
                r = h.get("/v1/stats")
            except httpx.HTTPError:
                return None
            new = r.json()["replica"] if r.status_code == 200 else rid
            return new if new != rid else None

        wait_for(replaced, 120, "the broken replica replaced", interval=1)
        r = h.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_rate_limit_per_api_key_by_tokens(cluster):
    """Keys are limited separately, by tokens too (prompt + max_tokens x choices)."""
    def client(key):
        return cluster.client("guard", headers={"Authorization": f"Bearer {key}"})

    body = {"prompt": "a", "max_tokens": 60}
    with client(API_KEYS[1]) as h:
        assert h.post("/v1/completions", json=body).status_code == 200
        err = assert_error(h.post("/v1/completions", json=body), 429)
        assert err["code"] == "rate_limit_exceeded" and "token" in err["message"]
    with client(API_KEYS[2]) as h:  # another key: its own buckets
        assert h.post("/v1/completions", json=body).status_code == 200


def test_rate_limit_per_client_ip_from_trusted_proxy_header(cluster):
    """Without API keys the client is its IP; behind a trusted proxy, the right-most
    X-Forwarded-For entry (what that proxy appended)."""
    with cluster.client("fault") as h:
        a = {"X-Forwarded-For": "10.0.0.9, 192.0.2.1"}
        codes = [h.get("/v1/models", headers=a).status_code for _ in range(45)]
        assert 429 in codes and codes[0] == 200, codes
        b = {"X-Forwarded-For": "10.0.0.9, 192.0.2.2"}  # another client behind the proxy
        assert h.get("/v1/models", headers=b).status_code == 200
        assert h.get("/v1/models", headers=a).status_code == 429


def test_requests_written_for_vllm_are_served(cluster):
    """A `vllm bench serve`-style request (vLLM's fields, one it does not know), streamed
    with usage in every chunk; the same request is refused by a strict_requests app."""
    body = {"model": "raygpt", "prompt": "ROMEO:", "max_tokens": 6, "ignore_eos": True,
            "repetition_penalty": 1.1, "min_p": 0.05, "top_k": -1, "stop_token_ids": [],
            "use_beam_search": False, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with cluster.client("main") as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            raw = r.read().decode()
        ev = sse_events(raw)
        assert ev[-1] == "[DONE]"
        chunks = [json.loads(e) for e in ev[:-1]]
        assert all("usage" in c for c in chunks)  # continuous usage stats
        assert chunks[-1]["usage"]["completion_tokens"] == 6
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4,
                "min_p": 0.1, "repetition_penalty": 1.2, "top_k": -1, "chat_template_kwargs": {}}
        c = h.post("/v1/chat/completions", json=chat)
        assert c.status_code == 200 and c.json()["usage"]["completion_tokens"] <= 4, c.text
        card = h.get("/v1/models").json()["data"][0]
        assert card["max_model_len"] == BLOCK
    with cluster.client("over") as h:
        assert_error(h.post("/v1/completions", json={**body, "stream": False}), 400, "use_beam_search")
