"""raygpt.client (sync and async) against a real Ray Serve endpoint on 127.0.0.1: typed
completions equal to local greedy decoding, streaming, models/health, error types, and
503 retries provoked by real overload (max_ongoing_requests=1, max_queued_requests=1)."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import wait_serve_apps

from raygpt.client import (AsyncClient, BadRequestError, Client, Completion, NotFoundError,
                           OverloadedError)

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def model(char_data, tmp_path_factory):
    from raygpt.data.prepare import read_meta
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    torch.manual_seed(3)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64,
                      vocab_size=read_meta(char_data)["vocab_size"]))
    return str(save_model_dir(m, tmp_path_factory.mktemp("client") / "m", char_data / "tokenizer.json"))


def greedy(model_dir, prompt, n):
    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.model.io import load_model_dir

    m, _ = load_model_dir(model_dir)
    tok = load_tokenizer(Path(model_dir) / "tokenizer.json")
    ids = torch.tensor([tok.encode(prompt)])
    return tok.decode(m.generate(ids, n, temperature=0.0)[0, ids.shape[1]:].tolist())


def _app(name, model_dir, args, dep):
    return {"name": name, "route_prefix": f"/{name}", "import_path": "raygpt.serving.app:build_app",
            "args": {"model_dir": model_dir, **args},
            "deployments": [{"name": "GPTServer", "ray_actor_options": {"num_cpus": 0.25},
                             "health_check_period_s": 2, **dep}]}


ROOT = Path(__file__).resolve().parents[2]


def _debug_yaml_app(model_dir):
    """serve/debug.yaml's application as shipped, with the model path filled in (both
    fields), under /doc and with a quarter CPU (this box's Ray has 6 logical CPUs)."""
    import yaml

    (app,) = yaml.safe_load((ROOT / "serve" / "debug.yaml").read_text())["applications"]
    app["name"], app["route_prefix"] = "doc", "/doc"
    app["args"]["model_dir"] = model_dir
    (dep,) = app["deployments"]
    dep["user_config"]["model_dir"] = model_dir
    dep["ray_actor_options"]["num_cpus"] = 0.25
    return app


@pytest.fixture(scope="module")
def endpoint(ray_session, model):
    from conftest import free_port
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    cfg = {"http_options": http, "applications": [
        _app("main", model, {"max_slots": 32}, {"max_ongoing_requests": 64}),
        _debug_yaml_app(model),
        _app("over", model, {"max_slots": 1, "step_delay_s": 0.05},
             {"max_ongoing_requests": 1, "max_queued_requests": 1,
              "backpressure_config": {"status_code": 503, "retry_after_s": 1}}),
    ]}
    try:
        serve_start(http_options=http).deploy_apps(ServeDeploySchema.model_validate(cfg))
        wait_serve_apps(("main", "over", "doc"), timeout=240)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def version(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text())["version"]


def test_sync_client(endpoint, model):
    want = greedy(model, "ROMEO:", 24)
    with Client(f"{endpoint}/main", timeout=60) as c:
        r = c.completions("ROMEO:", max_tokens=24, temperature=0)
        assert isinstance(r, Completion) and r.text == want
        assert r.system_fingerprint == version(model) and r.model == "raygpt"
        assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 24
        assert r.choices[0].finish_reason == "length"
        pieces = list(c.stream("ROMEO:", max_tokens=24, temperature=0))
        assert len(pieces) > 1 and "".join(pieces) == want
        events = list(c.stream_events("ROMEO:", max_tokens=24, temperature=0, include_usage=True))
        assert events[-1].usage.completion_tokens == 24 and events[-1].choices == []
        assert events[-2].choices[0].finish_reason == "length"
        two = c.completions(["First", "All:"], n=2, max_tokens=5, temperature=0.8, seed=1)
        assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
        (card,) = c.models()
        assert card.version == version(model) and card.context_length == 64
        assert card.model_dir is None  # server paths only on /admin/model
        assert c.health().status == "ok"
        with pytest.raises(BadRequestError) as ei:
            c.completions("ROMEO:", max_tokens=0)
        assert ei.value.param == "max_tokens" and ei.value.status_code == 400
        with pytest.raises(NotFoundError):
            c.completions("ROMEO:", model="gpt-4")
        assert c.retries_done == 0


def test_async_client(endpoint, model):
    prompts = ["ROMEO:", "JULIET:", "First", "All:"]
    want = {p: greedy(model, p, 16) for p in prompts}

    async def main():
        async with AsyncClient(f"{endpoint}/main", timeout=60) as c:
            plain = await asyncio.gather(*(c.completions(p, max_tokens=16, temperature=0) for p in prompts))

            async def streamed(p):
                return "".join([s async for s in c.stream(p, max_tokens=16, temperature=0)])

            streams = await asyncio.gather(*(streamed(p) for p in prompts))
            cards = await c.models()
            return plain, streams, cards

    plain, streams, cards = asyncio.run(main())
    assert [r.text for r in plain] == [want[p] for p in prompts]
    assert streams == [want[p] for p in prompts]
    assert cards[0].version == version(model)


def _burst(url, n, **client_kw):
    """n simultaneous requests, each through its own Client; -> (texts, errors, retries)."""
    texts, errors, retries = [], [], []
    barrier = threading.Barrier(n)

    def one(i):
        with Client(url, timeout=120, **client_kw) as c:
            barrier.wait()
            try:
                if i % 2:
                    texts.append("".join(c.stream("hear", max_tokens=10, temperature=0)))
                else:
                    texts.append(c.completions("hear", max_tokens=10, temperature=0).text)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            retries.append(c.retries_done)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    return texts, errors, retries


def test_503_retry_on_real_overload(endpoint, model):
    url = f"{endpoint}/over"
    want = greedy(model, "hear", 10)
    # without retries some of a burst are turned away with 503 + Retry-After
    texts, errors, _ = _burst(url, 10, max_retries=0)
    assert errors, "no 503 from an overloaded app"
    assert all(isinstance(e, OverloadedError) and e.status_code == 503 and e.retry_after == 1
               for e in errors), errors
    assert all(t == want for t in texts)
    # with retries (backoff honoring Retry-After) every request of the burst completes
    texts, errors, retries = _burst(url, 10, max_retries=40, backoff=0.2, max_backoff=2)
    assert not errors, errors
    assert texts == [want] * 10 and sum(retries) > 0
    print(f"10 requests on an app taking 2 at a time: {sum(retries)} retries, all completed")


def test_readme_client_snippet_runs_as_a_script(endpoint, model, tmp_path):
    """README's "Python client" snippet, run as a script against serve/debug.yaml's app
    (the only change: its base URL)."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    sec = readme[readme.index("## Python client"):]
    code = re.search(r"```python\n(.*?)```", sec, re.S).group(1)
    assert code.count("http://127.0.0.1:8000") == 2 and "asyncio.run(" in code
    script = tmp_path / "snippet.py"
    script.write_text(code.replace("http://127.0.0.1:8000", f"{endpoint}/doc"))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    want = greedy(model, "ROMEO:", 50)
    assert r.stdout.startswith(want + "\n"), (r.stdout[:200], want)
    assert f"{version(model)} ok" in r.stdout
