"""End to end on a real single-node cluster (loopback only): `ray start --head`, then

1. `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/debug.yaml
   --storage TMP --name e2e` ends SUCCEEDED with a checkpoint under TMP/e2e, and
   `ray job logs` shows step lines; the uploaded working dir is small (size printed);
2. a second job submitted with --no-wait is stopped with `ray job stop` and ends STOPPED;
3. `raygpt export` of the checkpoint, `serve deploy` of serve/debug.yaml (model_dir and
   HTTP port rewritten) on the same cluster, and POST /v1/completions answers.

The cluster is always torn down, never with `ray stop` (see raycluster.py).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import wait_for
from raycluster import BIN, RAY, REPO, TERMINAL, Cluster, free_ports, job_status, run, started, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SERVE = str(BIN / "serve")
RAYGPT = str(BIN / "raygpt")
MAX_UPLOAD_BYTES = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with started(Cluster(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


def upload_size() -> tuple[int, str, int]:
    """(bytes, gcs URI, files) of the package `--working-dir .` makes, with Ray's own code
    and rules (.gitignore, .rayignore, the default excludes)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package, get_uri_for_directory

    excludes = get_runtime_env_default_excludes()
    uri = get_uri_for_directory(str(REPO), include_gitignore=True, excludes=excludes)
    with tempfile.TemporaryDirectory() as d:
        z = Path(d) / "pkg.zip"
        create_package(str(REPO), z, include_gitignore=True, excludes=excludes)
        return z.stat().st_size, uri, len(zipfile.ZipFile(z).namelist())


# ---------------------------------------------------------------- the test


def test_job_submit_stop_export_serve(cluster, tmp_path):
    t_all = time.time()
    storage = tmp_path / "storage"
    env = cluster.env

    # -- 1. a training job to completion -----------------------------------------------
    size, uri, n_files = upload_size()
    print(f"working-dir upload: {size / 1e6:.2f} MB ({size} bytes, {n_files} entries) as {uri}")
    assert size < MAX_UPLOAD_BYTES, f"--working-dir . would upload {size / 1e6:.1f} MB"

    job1 = f"e2e-train-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    p = run([RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
             "--submission-id", job1, "--",
             "python", "jobs/train.py", "--config", "jobs/configs/debug.yaml",
             "--storage", str(storage), "--name", "e2e"], env, timeout=600, check=False)
    out = p.stdout + p.stderr
    print(f"job 1 took {time.time() - t0:.1f}s")
    m = re.search(r"(gcs://_ray_pkg_[0-9a-f]+\.zip)", out)
    if m:
        print(f"uploaded package {m.group(1)} (computed here: {uri})")
    assert p.returncode == 0, f"job submit rc {p.returncode}:\n{out[-6000:]}"
    assert job_status(cluster, job1) == "SUCCEEDED"

    run_dir = storage / "e2e"
    ckpts = sorted(d for d in run_dir.glob("checkpoint_*") if (d / "raygpt_state.json").is_file())
    assert ckpts, f"no checkpoint under {run_dir}: {list(run_dir.iterdir()) if run_dir.exists() else 'missing'}"
    print(f"checkpoints: {[c.name for c in ckpts]}")

    logs = run([RAY, "job", "logs", "--address", cluster.dashboard, job1], env, timeout=60).stdout
    steps = [int(s) for s in re.findall(r"step (\d+)/\d+", logs)]
    assert steps, f"no progress lines in `ray job logs`:\n{logs[-3000:]}"
    assert max(steps) == 20, f"steps seen: {steps}"

    # -- 2. a job stopped with `ray job stop` ------------------------------------------
    job2 = f"e2e-stop-{uuid.uuid4().hex[:8]}"
    run([RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
         "--submission-id", job2, "--no-wait", "--",
         "python", "jobs/train.py", "--config", "jobs/configs/debug.yaml",
         "--storage", str(storage), "--name", "e2e-stopped",
         "--set", "train.max_steps=100000", "--set", "checkpoint.every=0"], env, timeout=120)
    # Wait until it trains (a step line in its logs), so the stop hits a live run.
    def trained() -> bool:
        status = job_status(cluster, job2)
        assert status not in TERMINAL, f"job 2 ended {status} before it was stopped"
        if status != "RUNNING":
            return False
        logs2 = run([RAY, "job", "logs", "--address", cluster.dashboard, job2], env, timeout=60).stdout
        return bool(re.search(r"step \d+/100000", logs2))

    wait_for(trained, 300, "job 2 logging a step", interval=3)
    t0 = time.time()
    run([RAY, "job", "stop", "--address", cluster.dashboard, job2], env, timeout=120)
    status = wait_status(cluster, job2, ("STOPPED",), timeout=60)
    print(f"job 2 {status} {time.time() - t0:.1f}s after `ray job stop`")
    assert status == "STOPPED"

    # -- 3. export and serve on the same cluster ---------------------------------------
    model_dir = tmp_path / "model"
    run([RAYGPT, "export", str(ckpts[-1]), "--out", str(model_dir)], env, timeout=300)
    assert (model_dir / "model.safetensors").is_file(), sorted(os.listdir(model_dir))

    serve_cfg = yaml.safe_load((REPO / "serve" / "debug.yaml").read_text())
    (http_port,) = free_ports(1)
    serve_cfg.setdefault("http_options", {}).update({"host": "127.0.0.1", "port": http_port})
    apps = serve_cfg["applications"]
    for app in apps:
        app.setdefault("args", {})["model_dir"] = str(model_dir)
        for dep in app.get("deployments") or []:  # a user_config model_dir would win
            if "model_dir" in (dep.get("user_config") or {}):
                dep["user_config"]["model_dir"] = str(model_dir)
    cfg_path = tmp_path / "serve.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg, sort_keys=False))
    t0 = time.time()
    run([SERVE, "deploy", str(cfg_path), "--address", cluster.dashboard], env, timeout=120)

    route = apps[0].get("route_prefix", "/").rstrip("/")
    url = f"http://127.0.0.1:{http_port}{route}/v1/completions"
    last = [None]

    def completion():
        st = run([SERVE, "status", "--address", cluster.dashboard], env, timeout=60, check=False).stdout
        state = yaml.safe_load(st) or {}
        app_states = {k: v.get("status") for k, v in (state.get("applications") or {}).items()}
        if any(s in ("DEPLOY_FAILED", "UNHEALTHY") for s in app_states.values()):
            raise AssertionError(f"serve app failed:\n{st}")
        if not (app_states and all(s == "RUNNING" for s in app_states.values())):
            return None
        try:
            r = httpx.post(url, json={"prompt": "ROMEO:", "max_tokens": 8, "temperature": 0}, timeout=60)
        except httpx.HTTPError as e:
            last[0] = repr(e)
            return None
        last[0] = f"{r.status_code} {r.text[:500]}"
        return r.json() if r.status_code == 200 else None

    body = wait_for(completion, 300, lambda: f"a completion from {url}: {last[0]}", interval=2)
    print(f"serve: RUNNING and answered in {time.time() - t0:.1f}s: {json.dumps(body)[:300]}")
    text = body["choices"][0]["text"]
    assert isinstance(text, str) and text, body
    print(f"e2e total {time.time() - t_all:.1f}s")
