"""Eval-gated promotion into a real Ray Serve application on 127.0.0.1 (CPU, tiny models).

Three char models on Shakespeare (the debug shape): A (served, briefly trained), a worse
candidate (random weights) and a better one B (trained longer). The worse one is refused
and A keeps serving; B is swapped in while client threads stream requests, none of which
fails; rollback puts A back. Both update paths are covered: a declaratively deployed app
(serve deploy / RayService) and an imperatively deployed one (serve.run / raygpt serve).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
import torch

from raygpt.errors import UserError

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

SHAPE = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)


def train_tiny(data_dir: Path, steps: int, out: Path, seed: int = 0, lr: float = 3e-3) -> str:
    """A debug-shaped model trained in this process (plain torch, no Ray: seconds)."""
    from raygpt.data.loader import BatchLoader
    from raygpt.data.prepare import read_meta
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=read_meta(data_dir)["vocab_size"], **SHAPE))
    if steps:
        opt = torch.optim.AdamW(m.parameters(), lr=lr)
        loader = BatchLoader(data_dir, "train", SHAPE["block_size"], 8, seed)
        for s in range(steps):
            _, loss = m(*loader.get(s))
            loss.backward()
            opt.step()
            opt.zero_grad()
    save_model_dir(m.eval(), out, data_dir / "tokenizer.json")
    return str(out)


def version(d: str) -> str:
    return json.loads((Path(d) / "config.json").read_text())["version"]


@pytest.fixture(scope="module")
def models(char_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("promote-models")
    return {"a": train_tiny(char_data, 60, d / "a"),
            "worse": train_tiny(char_data, 0, d / "worse", seed=5),
            "b": train_tiny(char_data, 300, d / "b", seed=1)}


def _app(name, model_dir, step_delay=0.01):
    return {"name": name, "route_prefix": f"/{name}", "import_path": "raygpt.serving.app:build_app",
            "args": {"model_dir": model_dir, "max_slots": 16, "step_delay_s": step_delay},
            "deployments": [{"name": "GPTServer", "user_config": {"model_dir": model_dir},
                             "max_ongoing_requests": 32, "health_check_period_s": 2,
                             "ray_actor_options": {"num_cpus": 0.25}}]}


def _wait_running(names, timeout=240):
    from conftest import wait_serve_apps

    wait_serve_apps(names, timeout)


@pytest.fixture(scope="module")
def serve_apps(ray_session, models):
    """'lm' deployed declaratively (what `serve deploy` does), 'imp' with serve.run."""
    from conftest import free_port
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from raygpt.serving.app import make_app

    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    try:
        serve_start(http_options=http).deploy_apps(ServeDeploySchema.model_validate(
            {"http_options": http, "applications": [_app("lm", models["a"])]}))
        serve.run(make_app({"model_dir": models["a"], "max_slots": 8},
                           ray_actor_options={"num_cpus": 0.25}),
                  name="imp", route_prefix="/imp", blocking=False)
        _wait_running(["lm", "imp"])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def dashboard(ray_session):
    """The dashboard URL (Serve's REST API) of the test Ray, or None without one."""
    ctx = ray_session.init(ignore_reinit_error=True)
    web = ctx.address_info.get("webui_url") if hasattr(ctx, "address_info") else None
    return f"http://{web}" if web else None


def card(base, app):
    """The admin card (model_dir and last_update_error are not on /v1/models)."""
    r = httpx.get(f"{base}/{app}/admin/model", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def replica_ids(app):
    from ray.serve.context import _get_global_client

    d = _get_global_client().get_serve_details()["applications"][app]["deployments"]["GPTServer"]
    return sorted(r["replica_id"] for r in d["replicas"])


class Load:
    """Client threads sending streamed and plain completions without retries: every
    non-200 answer or broken stream is a failed request."""

    def __init__(self, url, n_threads=4):
        self.url, self.stop = url, threading.Event()
        self.ok: list[str] = []      # system_fingerprint of each completed request
        self.failed: list = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(n_threads)]

    def _run(self, i):
        with httpx.Client(base_url=self.url, timeout=120) as h:
            while not self.stop.is_set():
                body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
                try:
                    if i % 2:
                        with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                            raw = r.read().decode()
                        if r.status_code != 200 or not raw.endswith("data: [DONE]\n\n"):
                            self.failed.append((r.status_code, raw[-200:]))
                            continue
                        fps = {json.loads(e[6:])["system_fingerprint"]
                               for e in raw.split("\n\n") if e.startswith("data: {")}
                        if len(fps) != 1:
                            self.failed.append(("mixed versions", fps))
                            continue
                        self.ok.append(fps.pop())
                    else:
                        r = h.post("/v1/completions", json=body)
                        if r.status_code != 200:
                            self.failed.append((r.status_code, r.text[:200]))
                            continue
                        j = r.json()
                        assert j["usage"]["completion_tokens"] == 20
                        self.ok.append(j["system_fingerprint"])
                except Exception as e:  # noqa: BLE001 - any exception is a failed request
                    self.failed.append(repr(e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_promote_refuse_swap_under_load_rollback(serve_apps, models, char_data, tmp_path, dashboard):
    from raygpt.lifecycle.promote import promote, read_log, rollback

    base, state = serve_apps, tmp_path / "state"
    kw = dict(data=str(char_data), state=state, steps=8)
    assert card(base, "lm")["version"] == version(models["a"])
    replicas = replica_ids("lm")

    # 1. a worse candidate is refused; nothing changes
    rec = promote(models["worse"], "lm", **kw)
    assert rec["decision"] == "refused", rec
    assert rec["candidate"]["val_loss"] > rec["served"]["val_loss"]
    c = card(base, "lm")
    assert c["version"] == version(models["a"]) and c["model_dir"] == models["a"]

    # 2. the better one is swapped in under load, no request fails
    with Load(f"{base}/lm") as load:
        wait_for(lambda: len(load.ok) >= 8, 60, "8 answers before the swap", interval=0.1)
        rec = promote(models["b"], "lm", **kw)
        n_at_swap = len(load.ok)
        wait_for(lambda: len(load.ok) >= n_at_swap + 8, 60, "8 answers after the swap", interval=0.1)
    assert rec["decision"] == "promoted", rec
    assert rec["candidate"]["val_loss"] < rec["served"]["val_loss"]
    assert rec["previous"] == models["a"] and rec["serving_version"] == version(models["b"])
    assert not load.failed, load.failed[:3]
    seen = set(load.ok)
    assert seen == {version(models["a"]), version(models["b"])}, seen
    assert load.ok[-1] == version(models["b"])
    print(f"{len(load.ok)} requests during the promotion, 0 failed")
    assert card(base, "lm")["model_dir"] == models["b"]
    assert replica_ids("lm") == replicas  # a lightweight update: no replica restarted

    # 3. rollback restores A (through the dashboard's Serve REST API, as from another
    # cluster); a second rollback has nothing left to undo
    print(f"rollback through {dashboard or 'Ray (no dashboard here)'}")
    rb = rollback("lm", state=state, dashboard=dashboard)
    assert rb["decision"] == "rolled_back" and rb["to"] == models["a"] and rb["from"] == models["b"]
    assert card(base, "lm")["version"] == version(models["a"])
    with pytest.raises(UserError, match="no promotion"):
        rollback("lm", state=state)

    log = read_log("lm", state)
    assert [r["decision"] for r in log] == ["refused", "promoted", "rolled_back"]
    for r in log[:2]:  # both scores in every promotion decision
        assert r["candidate"]["val_loss"] > 0 and r["served"]["val_loss"] > 0
        assert r["eval"]["tokens"] == 8 * 16 * 32 and r["data_dir"] == str(char_data)


def test_promote_imperative_app_and_cli(serve_apps, models, char_data, tmp_path, capsys):
    """serve.run-deployed app (raygpt serve): promoted without a replica restart; the CLI
    gives exit 3 on a refusal and JSON records; a broken candidate fails cleanly."""
    from raygpt.cli import main

    base, state = serve_apps, str(tmp_path / "state")
    replicas = replica_ids("imp")
    common = ["--serve-app", "imp", "--data", str(char_data), "--state-dir", state, "--steps", "4", "--json"]
    assert main(["promote", models["worse"], *common]) == 3
    assert json.loads(capsys.readouterr().out)["decision"] == "refused"
    assert main(["promote", models["b"], *common, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "would_promote"
    assert card(base, "imp")["version"] == version(models["a"])
    assert main(["promote", models["b"], *common]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["decision"] == "promoted" and rec["previous"] == models["a"]
    assert card(base, "imp")["version"] == version(models["b"])
    assert replica_ids("imp") == replicas
    assert main(["rollback", "--serve-app", "imp", "--state-dir", state, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["to"] == models["a"]
    assert card(base, "imp")["version"] == version(models["a"])
    # unknown app: one line, exit 2
    assert main(["promote", models["b"], "--serve-app", "nope", "--state-dir", state]) == 2
    assert "no such Serve application" in capsys.readouterr().err


def test_refused_update_is_reported(serve_apps, models, tmp_path):
    """A candidate directory the replicas cannot load: the swap fails, the old model
    keeps serving, the failure is logged (set_model_dir is what promote calls), and the
    user_config is back on the last good model: a replica started later (scale-up) serves
    the same version as its peers. Then a re-export into the same path is picked up."""
    import shutil

    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from raygpt.lifecycle.serve_ops import SwapError, app_info, replica_states, set_model_dir

    broken = tmp_path / "broken"
    shutil.copytree(models["b"], broken)
    (broken / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(SwapError, match="refused"):
        set_model_dir("lm", str(broken), timeout=120)
    c = card(serve_apps, "lm")
    assert c["model_dir"] == models["a"] and c["last_update_error"]["model_dir"] == str(broken)
    uc = app_info("lm").user_config
    assert uc["model_dir"] == models["a"] and uc["version"] == version(models["a"])
    # a new replica (scale to 2) loads what its peer serves
    client = _get_global_client()

    def scale(n):
        details = client.get_serve_details()
        cfg = details["applications"]["lm"]["deployed_app_config"]
        cfg["deployments"][0]["num_replicas"] = n
        client.deploy_apps(ServeDeploySchema.model_validate(
            {"http_options": details["http_options"], "applications": [cfg]}))
        def running():
            states = replica_states("lm")
            return states if len(states) == n and all(states.values()) else None

        return wait_for(running, 180, lambda: f"lm running {n} replicas: {replica_states('lm')}", interval=0.5)

    states = scale(2)
    assert {s["version"] for s in states.values()} == {version(models["a"])}, states
    scale(1)
    # a re-export into the same directory (new weights, new version) is picked up
    same = tmp_path / "same"
    shutil.copytree(models["a"], same)
    set_model_dir("lm", str(same), timeout=120)
    shutil.rmtree(same)
    shutil.copytree(models["b"], same)
    c = set_model_dir("lm", str(same), timeout=120)
    assert c["model_dir"] == str(same) and c["version"] == version(models["b"])
    assert {s["version"] for s in replica_states("lm").values()} == {version(models["b"])}
    set_model_dir("lm", models["a"], timeout=120)  # back to A for whoever comes next


def _load_retrain():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "jobs" / "retrain.py"
    spec = importlib.util.spec_from_file_location("raygpt_job_retrain", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_retrain_job_finetunes_and_promotes(serve_apps, models, tmp_path):
    """jobs/retrain.py end to end: what 'lm' serves is fine-tuned on new text (a ship's
    log, encoded with the served model's tokenizer) under Ray Train, exported, and
    promoted because it beats the served model on the new data's held-out split."""
    import random

    from raygpt.lifecycle.promote import read_log
    from raygpt.lifecycle.serve_ops import set_model_dir

    rng = random.Random(0)
    words = ["the captain", "a sailor", "sighted", "mended", "the north sail", "a grey whale", "at dawn"]
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "log.txt").write_text(
        "\n".join("LOG: " + " ".join(rng.choice(words) for _ in range(5)) + "." for _ in range(400)))
    job = _load_retrain()
    state = str(tmp_path / "state")
    assert card(serve_apps, "lm")["model_dir"] == models["a"]
    try:
        rc = job.main(["--serve-app", "lm", "--new-data", str(tmp_path / "incoming"),
                       "--storage", str(tmp_path / "runs"), "--name", "nightly", "--preset", "debug",
                       "--steps", "60", "--set", "run.cpus_per_worker=1", "--set", "checkpoint.every=0",
                       "--set", "train.eval_every=30", "--set", "optim.lr=3e-3",
                       "--state-dir", state, "--eval-steps", "8"])
        assert rc == 0
        (rec,) = read_log("lm", state)
        assert rec["decision"] == "promoted" and rec["previous"] == models["a"]
        assert rec["candidate_dir"] == str(tmp_path / "runs" / "models" / "nightly")
        assert rec["candidate"]["val_loss"] < rec["served"]["val_loss"]
        assert rec["data_dir"] == str(tmp_path / "runs" / "data" / "nightly")
        assert card(serve_apps, "lm")["model_dir"] == rec["candidate_dir"]
        summary = json.loads((tmp_path / "runs" / "nightly" / "retrain.json").read_text())
        assert summary["decision"] == "promoted" and summary["train"]["steps"] == 60
    finally:
        set_model_dir("lm", models["a"], timeout=120)


def test_rollback_stack_and_log(tmp_path):
    from raygpt.lifecycle.promote import append_log, log_path, read_log, rollback_stack

    recs = [
        {"action": "promote", "decision": "promoted", "previous": "/m/a"},
        {"action": "promote", "decision": "refused"},
        {"action": "promote", "decision": "promoted", "previous": "/m/b"},
        {"action": "rollback", "decision": "rolled_back", "to": "/m/b"},
        {"action": "rollback", "decision": "rolled_back", "to": "/m/x", "explicit": True},
        {"action": "promote", "decision": "failed", "previous": "/m/zzz"},
    ]
    assert rollback_stack(recs) == ["/m/a"]
    assert rollback_stack(recs[:3]) == ["/m/a", "/m/b"]
    for r in recs:
        append_log("my app/1", r, tmp_path)
    p = log_path("my app/1", tmp_path)
    assert p.parent == tmp_path and "/" not in p.name
    with open(p, "a") as f:
        f.write('{"torn line')  # a crash mid-write is skipped
    assert read_log("my app/1", tmp_path) == recs


def test_eval_default_data_without_a_recorded_config(models, char_data, tmp_path, monkeypatch):
    """A model dir with no raygpt_config (exported by hand): evaluated on the bundled
    corpus encoded with its own tokenizer, which gives the same val tokens as `raygpt
    prepare` of that corpus."""
    from raygpt.lifecycle.eval import evaluate_model

    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path))
    r = evaluate_model(models["b"], steps=3, samples=0)
    assert r["data_dir"].startswith(str(tmp_path))
    assert r["val_loss"] == pytest.approx(evaluate_model(models["b"], char_data, steps=3, samples=0)["val_loss"])
    again = evaluate_model(models["b"], steps=3, samples=0)  # cached, not encoded again
    assert again["data_dir"] == r["data_dir"]
