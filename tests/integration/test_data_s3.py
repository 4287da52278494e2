"""prepare and the loader against object storage: a local S3 API (moto's server on
127.0.0.1; nothing leaves the machine). The corpus is read from s3://, the shards are
written to s3:// (meta.json last), and a loader on the URI reads the batches of a local
run through the node cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import local_s3
from raygpt.data.loader import BatchLoader
from raygpt.data.prepare import prepare_corpus, read_meta


@pytest.fixture
def s3(tmp_path):
    with local_s3(tmp_path, "bucket") as (fs, endpoint):
        q = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        yield fs, (lambda key: f"s3://test:test@bucket/{key}?{q}")


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
