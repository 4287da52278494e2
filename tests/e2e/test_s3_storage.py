"""Training against object storage: `--storage s3://...` served by a local S3 API (moto,
on 127.0.0.1). Checkpoints go through Ray's pyarrow filesystem; metrics and the summary
are uploaded beside them; a second run of the same name resumes; export reads the URI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import local_s3

pytestmark = [pytest.mark.slow]


@pytest.fixture
def s3(tmp_path):
    with local_s3(tmp_path, "raygpt-test") as (fs, endpoint):
        yield fs, f"s3://test:test@raygpt-test/runs?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def _train(uri, tmp_path, steps):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGPT_CACHE_DIR"] = str(tmp_path / "cache")
    # moto's CompleteMultipartUpload answers do not carry the checksums that newer AWS
    # SDKs (inside pyarrow) validate by default; real S3 does.
    env["AWS_REQUEST_CHECKSUM_CALCULATION"] = "WHEN_REQUIRED"
    env["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "WHEN_REQUIRED"
    return subprocess.run(
        [sys.executable, "-m", "raygpt.cli", "train", "--preset", "debug", "--storage", uri, "--name", "s3run",
         "--set", f"train.max_steps={steps}", "--set", "optim.decay_steps=20"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def test_train_resume_export_on_s3(s3, tmp_path):
    fs, uri = s3
    r = _train(uri, tmp_path, 10)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import pyarrow.fs as pafs

    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector("raygpt-test/runs/s3run"))}
    assert {"metrics.jsonl", "summary.json", "checkpoint_0000010"} <= names, names
    with fs.open_input_stream("raygpt-test/runs/s3run/summary.json") as f:
        summary = json.loads(f.read())
    assert summary["steps"] == 10 and summary["checkpoint"].startswith("s3://")
    r = _train(uri, tmp_path, 20)  # same name: resumes at step 10
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "restored step 10" in r.stdout + r.stderr
    with fs.open_input_stream("raygpt-test/runs/s3run/metrics.jsonl") as f:
        starts = [json.loads(x) for x in f.read().decode().splitlines() if '"start"' in x]
    assert [s["step"] for s in starts] == [0, 10]
    run_uri = uri.replace("/runs?", "/runs/s3run?")
    out = tmp_path / "model"
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "export", run_uri, "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step"] == 20
