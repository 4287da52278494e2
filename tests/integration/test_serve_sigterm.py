"""`raygpt serve` as a process: SIGTERM drains (an in-flight stream finishes, new requests
get 503 + Retry-After, which clients retry, not the 404 of a deleted app) and the process
exits 0. Its own local Ray (what a user runs)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from conftest import free_port, start_serve, tiny_model_dir, wait_for, wait_serve_healthy

pytestmark = pytest.mark.slow

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def test_sigterm_drains_and_exits_0(tmp_path):
    md = tiny_model_dir(tmp_path, TEXT)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc, out = start_serve(
        [str(md), "--port", str(port),
         # 0.2 s a step: the stream below lasts ~11 s after the signal, the window in
         # which the drain's 503 is checked (seen ~0.5 s after the signal here)
         "--no-dashboard", "--num-cpus", "0.5", "--step-delay", "0.2", "--drain-timeout", "60"], env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_serve_healthy(proc, out, base)
        body = {"prompt": "First", "max_tokens": 55, "temperature": 0, "stream": True}
        chunks = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:  # the stream is running
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    break
            proc.send_signal(signal.SIGTERM)

            def draining() -> bool:  # the replica took the drain (its health turns 503)
                h = httpx.get(f"{base}/healthz", timeout=5)
                assert h.status_code in (200, 503), f"the app is gone before the stream ended: {h.status_code}"
                return h.status_code == 503 and h.json()["error"]["code"] == "draining"

            wait_for(draining, 60, "the replica draining", interval=0.1)
            new = httpx.post(f"{base}/v1/completions", json={"prompt": "First", "max_tokens": 5}, timeout=30)
            assert new.status_code == 503 and new.json()["error"]["code"] == "draining", new.text
            assert int(new.headers["retry-after"]) >= 1
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                elif line == "data: [DONE]":
                    chunks.append("DONE")
        assert chunks[-1] == "DONE", chunks[-3:]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"  # finished, not cut
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert len(text) == 55
        assert proc.wait(timeout=120) == 0, "".join(out)
        log = "".join(out)
        assert "draining" in log and "Traceback" not in log and "Aborted" not in log, log[-2000:]
        assert "drained 1 replica(s)" in log and "timed out" not in log, log[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
