"""`raygpt serve` in a real process + the playground page in headless Chromium.

Chromium (Debian package `chromium`) is driven over the Chrome DevTools Protocol with the
`websockets` client (installed with ray[serve] through uvicorn[standard]). Skipped when
chromium is not installed.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, tiny_model_dir, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east.\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("playground"), TEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`raygpt serve MODEL_DIR --port P` with its own local Ray; Ctrl-C (SIGINT) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ADDRESS"] = "local"  # never join another test's cluster
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "raygpt.cli", "serve", str(model_dir), "--port", str(port),
           "--no-dashboard", "--num-cpus", "1", "--max-slots", "4", "--step-delay", "0.03"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"raygpt serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url + "/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 240, lambda: f"raygpt serve healthy:\n{log.read_text()[-3000:]}", interval=1)
        yield url, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve.shutdown + ray.shutdown
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


class CDP:
    """Minimal Chrome DevTools Protocol client over one page target's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 30, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"

        def port_open() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"chromium exited: {proc.stderr.read().decode()[-2000:]}")
            return port_file.exists() and bool(port_file.read_text().strip())

        wait_for(port_open, 60, "chromium opening its DevTools port", interval=0.1)
        devtools_port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _wait(cdp: CDP, expr: str, timeout: float = 60):
    return wait_for(lambda: cdp.eval(expr), timeout, expr, interval=0.1)


def test_playground_streams_a_completion(server, browser, model_dir):
    import torch

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.model.io import load_model_dir

    url, log = server
    cdp = browser
    cdp.call("Page.navigate", url=url + "/")
    _wait(cdp, "document.readyState === 'complete' && !!document.getElementById('generate')")
    # the page asked GET /v1/models and shows the version being served
    version = json.loads((Path(model_dir) / "config.json").read_text())["version"]
    assert _wait(cdp, f"document.getElementById('model').textContent.includes('{version}')")

    prompt, n = "ROMEO:", 40
    cdp.eval(f"""(() => {{
        document.getElementById('prompt').value = {json.dumps(prompt)};
        for (const [id, v] of [['max_tokens', {n}], ['temperature', 0]]) {{
            const el = document.getElementById(id); el.value = String(v);
            el.dispatchEvent(new Event('input'));
        }}
        window.__chunks = [];
        const target = document.getElementById('output');
        new MutationObserver(() => {{
            const c = document.getElementById('completion');
            if (c) window.__chunks.push(c.textContent.length);
        }}).observe(target, {{subtree: true, childList: true, characterData: true}});
        document.getElementById('generate').click();
        return true;
    }})()""")
    _wait(cdp, "document.body.dataset.finished === '1'", timeout=120)
    text = cdp.eval("document.getElementById('completion').textContent")
    status = cdp.eval("document.getElementById('status').textContent")
    lengths = cdp.eval("window.__chunks")

    model, _ = load_model_dir(model_dir)
    tok = load_tokenizer(Path(model_dir) / "tokenizer.json")
    ids = torch.tensor([tok.encode(prompt)])
    expected = tok.decode(model.generate(ids, n, temperature=0.0)[0, ids.shape[1]:].tolist())
    assert text == expected  # greedy output of the served model, as `raygpt generate` gives
    assert status.startswith("done: length") and f"{n} tokens" in status, status
    # streamed: the completion grew in several steps, not in one piece
    growth = sorted({x for x in lengths if 0 < x})
    assert len(growth) >= 3 and growth[-1] == len(expected), lengths
    # the server printed its URL
    assert url in log.read_text()
