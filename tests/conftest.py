"""Shared fixtures. One local Ray instance per test session (starting Ray costs ~5-10 s
on this 2-core machine); tests that need their own cluster (multi-node, `ray start`)
run it in a subprocess instead.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Keep Ray's own usage stats / metrics exporters quiet and offline.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Worker groups start slowly on a loaded 2-core machine (Ray Train's default is 60 s).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# Ray Train's controller polls its workers every 2 s; a test run's 20 steps take under a
# second, so most of a fit's tail is that wait.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# No test uses spot-reclaim notices; the watcher is one more actor process per fit
# (importing ray.train costs ~5 s of CPU on this machine).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# Logical CPUs for the shared instance: enough for 2-worker trainers plus a Serve app.
RAY_NUM_CPUS = int(os.environ.get("RAYGPT_TEST_CPUS", "6"))


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh instance, never a cluster another job started.
        ray.init(address="local", num_cpus=RAY_NUM_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, configure_logging=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


def wait_for(predicate, timeout: float, what, interval: float = 0.2):
    """Poll `predicate` until it returns something truthy (returned) or `timeout`
    seconds pass (AssertionError naming `what`: a string, or a callable for a message
    built at failure time). The one place tests wait on a condition."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what() if callable(what) else what}")
        time.sleep(interval)  # the poll interval of this one condition-with-deadline helper


def wait_serve_apps(names, timeout: float = 180) -> None:
    """Poll Serve until every named application is RUNNING; fail fast on
    DEPLOY_FAILED/UNHEALTHY, and after `timeout` seconds."""
    from ray import serve

    st: dict = {}

    def running() -> bool:
        apps = serve.status().applications
        st.clear()
        st.update({n: apps[n].status if n in apps else None for n in names})
        bad = {n: v for n, v in st.items() if v in ("DEPLOY_FAILED", "UNHEALTHY")}
        assert not bad, (bad, {n: apps[n].message for n in bad})
        return all(v == "RUNNING" for v in st.values())

    wait_for(running, timeout, lambda: f"Serve apps running: {st}", interval=0.5)


# Ports for servers the tests start. Not from bind(0): that draws from the kernel's
# ephemeral range (ip_local_port_range, 32768-60999 here), which every outgoing connection
# on the machine also draws from, so a port picked now and bound a second later by
# `ray start` could be taken meanwhile (CI once saw "Failed to start GCS"). This range lies
# below it and above Ray's worker ports (10002-19999); a start that still loses a port
# picks fresh ones and tries again (tests/e2e/raycluster.py).
PORT_RANGE = (20000, 32000)


def _bindable(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):  # Ray binds some of its servers on every address
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct ports that nothing listens on now, outside the ephemeral range."""
    import random

    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < n:
        p = rng.randrange(*PORT_RANGE)
        if p not in ports and _bindable(p):
            ports.append(p)
    return ports


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def port():
    return free_port()


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """The bundled Shakespeare corpus prepared with the char tokenizer (session-wide)."""
    from raygpt.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare_corpus(None, out, tokenizer="char")
    return out


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group in this process for the module's tests (no Ray)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def tiny_model_dir(d, text: str, vocab_size: int | None = None):
    """A tiny char-level GPT (2 layers, 32 wide, seed 0) with a tokenizer trained on
    `text`, saved as a model directory d/model (tokenizer d/tokenizer.json). -> its Path.
    vocab_size: pad the model's vocabulary to this (ids beyond the tokenizer's are never
    sampled), e.g. GPT-2's size for requests that bias every id."""
    import torch

    from raygpt.data.tokenizer import train_char_tokenizer
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir

    tok = train_char_tokenizer(text)
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64,
                      vocab_size=vocab_size or tok.vocab_size))
    return save_model_dir(m, d / "model", tok.save(d / "tokenizer.json"))


def start_serve(args: list[str], env: dict):
    """`raygpt serve ARGS` as a process, its output (stdout and stderr) collected line by
    line into a list. -> (proc, that list)."""
    import subprocess
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "raygpt.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    return proc, out


def wait_serve_healthy(proc, out: list[str], base: str, timeout: float = 240) -> None:
    """Poll BASE/healthz until it answers 200; fails at once (with the output) when the
    process exits."""
    import httpx

    def healthy() -> bool:
        assert proc.poll() is None, "".join(out)
        try:
            return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout, lambda: "raygpt serve healthy:\n" + "".join(out), interval=0.5)


@contextlib.contextmanager
def local_s3(tmp_path, bucket: str):
    """A local S3 API (this environment's moto_server on a free port) with `bucket`
    created: yields (pyarrow S3FileSystem, "host:port"); the server stops after."""
    import subprocess

    import pyarrow.fs as pafs

    exe = moto_server()
    port = free_port()
    with open(tmp_path / "moto.log", "w") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
            fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                                   scheme="http", region="us-east-1", allow_bucket_creation=True)

            def created() -> bool:
                assert proc.poll() is None, (tmp_path / "moto.log").read_text()[-500:]
                try:
                    fs.create_dir(bucket)
                    return True
                except OSError:
                    return False

            wait_for(created, 20, lambda: f"local S3 server on port {port}: "
                                          f"{(tmp_path / 'moto.log').read_text()[-500:]}", interval=0.1)
            yield fs, f"127.0.0.1:{port}"
        finally:
            proc.kill()
            proc.wait()


def moto_server() -> str:
    """The moto_server of this interpreter's environment (a local S3 API for tests).
    Not the first one on PATH: a global moto 5.2.1 there answers CompleteMultipartUpload
    with a root tag pyarrow takes for an error (getmoto/moto#10055), which looked like a
    Ray bug for two sessions."""
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        pytest.skip("moto[server] is not installed in this environment (pip install -e '.[dev]')")
    return exe
