"""prepare and the loader against object storage: a local S3 API (moto's server on
127.0.0.1; nothing leaves the machine). The corpus is read from s3://, the shards are
written to s3:// (meta.json last), and a loader on the URI reads the batches of a local
run through the node cache."""
from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest

from conftest import free_port, moto_server
from raygpt.data.loader import BatchLoader
from raygpt.data.prepare import prepare_corpus, read_meta


@pytest.fixture
def s3(tmp_path, monkeypatch):
    exe = moto_server()
    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs = pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=f"127.0.0.1:{port}",
                           scheme="http", region="us-east-1", allow_bucket_creation=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            fs.create_dir("bucket")
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"local S3 server did not start: {(tmp_path / 'moto.log').read_text()[-500:]}")
            time.sleep(0.1)
    q = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    yield fs, (lambda key: f"s3://test:test@bucket/{key}?{q}")
    proc.kill()
    proc.wait()
    log.close()


def test_prepare_reads_and_writes_s3_and_the_loader_reads_it_back(s3, tmp_path, monkeypatch):
    fs, uri = s3
    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "castle", "river", "sword", "night", "dawn", "crown", "ghost"]
    docs = [" ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(20, 200))))
            for _ in range(300)]
    local_dir = tmp_path / "corpus"
    local_dir.mkdir()
    for k in range(3):  # three jsonl files, also uploaded to s3://bucket/corpus/
        body = "".join(json.dumps({"text": d}) + "\n" for d in docs[k::3])
        (local_dir / f"part{k}.jsonl").write_text(body, encoding="utf-8")
        with fs.open_output_stream(f"bucket/corpus/part{k}.jsonl") as f:
            f.write(body.encode())
    ref = prepare_corpus(local_dir, tmp_path / "ref", tokenizer="bpe", vocab_size=300, shard_tokens=5_000,
                         use_ray=False)
    tok = str(tmp_path / "ref" / "tokenizer.json")
    meta = prepare_corpus(uri("corpus"), uri("data"), tokenizer=tok, shard_tokens=5_000, use_ray=False)
    assert (meta["documents"], meta["train_tokens"], meta["val_tokens"]) == (
        ref["documents"], ref["train_tokens"], ref["val_tokens"])
    from pyarrow.fs import FileSelector

    listed = {i.path for i in fs.get_file_info(FileSelector("bucket/data", recursive=True))}
    shards = {f"bucket/data/{x['file']}" for sp in ("train", "val") for x in meta["shards"][sp]}
    assert "bucket/data/meta.json" in listed and shards == {p for p in listed if p.endswith(".arrow")}
    assert read_meta(uri("data"))["train_tokens"] == ref["train_tokens"]
    a = BatchLoader(uri("data"), "train", 32, 8, seed=3)
    b = BatchLoader(tmp_path / "ref", "train", 32, 8, seed=3)
    for step in range(4):
        xa, ya = a.get(step)
        xb, yb = b.get(step)
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
