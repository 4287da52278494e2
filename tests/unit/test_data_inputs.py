"""prepare on real-corpus inputs: jsonl / parquet / gz / directory / glob / file:// URI, a
given tokenizer.json, end-of-text after every document, whole-document val, byte-range
splits of big files, URI output read through the node-local cache, and bad input."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raygpt.data import prepare as prep
from raygpt.data.loader import BatchLoader
from raygpt.data.prepare import prepare_corpus, read_meta
from raygpt.data.tokenizer import EOS_TOKEN, load_tokenizer
from raygpt.errors import UserError

WORDS = ("the ship sailed north under a grey sky while the crew sang of home and the "
         "captain wrote in his log: wind steady, seas calm, café naïve 日本 🙂").split()


def make_docs(n=150, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        k = int(rng.integers(5, 120))
        words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), k)]
        lines = [" ".join(words[i:i + 9]) for i in range(0, k, 9)]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def gpt2_style_tokenizer(tmp_path_factory) -> Path:
    """A GPT-2-style byte-level BPE tokenizer.json with <|endoftext|> as the LAST id (as in
    GPT-2, 50256), built here: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(make_docs(300, seed=9), trainer=trainer)
    tok.add_special_tokens([EOS_TOKEN])
    f = tmp_path_factory.mktemp("gpt2tok") / "tokenizer.json"
    tok.save(str(f))
    return f


def split_stream(data_dir: Path, split: str) -> np.ndarray:
    from raygpt.data.loader import TokenSplit

    ts = TokenSplit(data_dir, split)
    return ts.read(0, ts.num_tokens)


def documents(data_dir: Path, eos: int) -> dict[str, list[tuple]]:
    """Each split's token stream cut after every end-of-text: the documents it holds."""
    out = {}
    for split in ("train", "val"):
        ids = split_stream(data_dir, split).tolist()
        assert ids[-1] == eos  # the last document of each split ends too
        docs, cur = [], []
        for t in ids:
            cur.append(t)
            if t == eos:
                docs.append(tuple(cur))
                cur = []
        out[split] = docs
    return out


def write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as jsonl, jsonl.gz, parquet (2 files), and a directory of text
    files (one document each)."""
    paths = {}
    j = root / "jsonl"
    j.mkdir()
    half = len(docs) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        with open(j / f"part{k}.jsonl", "w", encoding="utf-8") as f:
            for i, d in enumerate(part):
                f.write(json.dumps({"id": i, "body": d}) + "\n")
                if i % 17 == 0:
                    f.write("\n")  # blank lines are skipped
    paths["jsonl"] = j
    g = root / "gz"
    g.mkdir()
    with gzip.open(g / "all.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    paths["gz"] = g
    p = root / "parquet"
    p.mkdir()
    pq.write_table(pa.table({"body": docs[:half], "n": list(range(half))}), p / "a.parquet",
                   row_group_size=16)
    pq.write_table(pa.table({"body": docs[half:]}), p / "b.parquet", row_group_size=16)
    paths["parquet"] = p
    t = root / "txt"
    t.mkdir()
    for i, d in enumerate(docs):
        (t / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    paths["txt"] = t
    return paths


def test_formats_give_the_tokens_of_their_text_with_a_given_tokenizer(tmp_path, gpt2_style_tokenizer):
    docs = make_docs(150)
    tok = load_tokenizer(gpt2_style_tokenizer)
    eos = tok.eos_id
    assert eos == tok.vocab_size - 1  # GPT-2 layout: end-of-text is the last id
    want = sorted(tuple(tok.encode(d) + [eos]) for d in docs)
    for fmt, path in write_formats(tmp_path, docs).items():
        out = tmp_path / f"out-{fmt}"
        meta = prepare_corpus(path, out, tokenizer=str(gpt2_style_tokenizer), text_field="body",
                              val_fraction=0.2, use_ray=False)
        # used unchanged: same file, same vocabulary and end-of-text id
        assert (out / "tokenizer.json").read_bytes() == gpt2_style_tokenizer.read_bytes()
        assert (meta["vocab_size"], meta["eos_id"], meta["tokenizer"]) == (tok.vocab_size, eos, "bpe")
        got = documents(out, eos)
        assert sorted(got["train"] + got["val"]) == want, fmt
        # whole documents, a seeded choice of about val_fraction of them
        assert 0.08 < len(got["val"]) / len(docs) < 0.35, (fmt, len(got["val"]))
        assert meta["documents"] == {"train": len(got["train"]), "val": len(got["val"])}
        assert meta["split"].startswith("whole documents")
    # the choice is seeded: the same seed gives the same split, another seed another
    for name, seed in (("s0", 0), ("s1", 1)):
        prepare_corpus(tmp_path / "jsonl", tmp_path / name, tokenizer=str(gpt2_style_tokenizer),
                       text_field="body", val_fraction=0.2, use_ray=False, seed=seed)
    same = split_stream(tmp_path / "s0", "val")
    assert np.array_equal(same, split_stream(tmp_path / "out-jsonl", "val"))
    assert not np.array_equal(same, split_stream(tmp_path / "s1", "val"))


def test_glob_and_file_uri_inputs(tmp_path, gpt2_style_tokenizer):
    docs = make_docs(120, seed=3)
    paths = write_formats(tmp_path, docs)
    tok = str(gpt2_style_tokenizer)
    ref = prepare_corpus(paths["jsonl"], tmp_path / "ref", tokenizer=tok, text_field="body", use_ray=False)
    glob = prepare_corpus(str(paths["jsonl"] / "part*.jsonl"), tmp_path / "glob", tokenizer=tok,
                          text_field="body", use_ray=False)
    uri = prepare_corpus(f"file://{paths['jsonl']}", tmp_path / "uri", tokenizer=tok,
                         text_field="body", use_ray=False)
    for m, d in ((glob, "glob"), (uri, "uri")):
        assert m["documents"] == ref["documents"]
        for s in ("train", "val"):
            assert np.array_equal(split_stream(tmp_path / d, s), split_stream(tmp_path / "ref", s))


def test_big_files_split_by_byte_ranges_give_the_same_tokens(tmp_path, ray_session):
    """A 1 MB text file and a jsonl file cut into ~64 KB segments, encoded in parallel Ray
    Data tasks, give the tokens of the unsplit run."""
    text = "\n".join(make_docs(600, seed=5))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "book.txt").write_text(text, encoding="utf-8")
    with open(tmp_path / "big" / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in make_docs(800, seed=6):
            f.write(json.dumps({"text": d}) + "\n")
    whole = prepare_corpus(tmp_path / "big", tmp_path / "whole", tokenizer="bpe", vocab_size=300,
                           use_ray=False)
    split = prepare_corpus(tmp_path / "big", tmp_path / "split", tokenizer=str(tmp_path / "whole"),
                           segment_bytes=64 << 10, use_ray=True, shard_tokens=20_000)
    assert ray_session.is_initialized()
    assert split["num_shards"]["train"] > 4  # many pieces, each wrote its own shards
    for s in ("train", "val"):
        assert np.array_equal(split_stream(tmp_path / "split", s), split_stream(tmp_path / "whole", s))
    assert split["documents"] == whole["documents"]


def test_bpe_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    from raygpt.data import tokenizer as tokmod

    fed = []
    real = tokmod.train_bpe_tokenizer

    def counting(texts, vocab_size):
        def gen():
            for t in texts:
                fed.append(len(t))
                yield t
        return real(gen(), vocab_size)

    monkeypatch.setattr(prep, "train_bpe_tokenizer", counting)
    d = tmp_path / "c"
    d.mkdir()
    for i in range(4):
        (d / f"p{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(200, i)))
    total = sum(f.stat().st_size for f in d.iterdir())
    meta = prepare_corpus(d, tmp_path / "out", tokenizer="bpe", vocab_size=300,
                          bpe_sample_bytes=40_000, use_ray=False)
    assert 0 < sum(fed) <= 40_000 + 4_000 < total  # a sample from every file, not the corpus
    assert meta["train_tokens"] > 0


def test_default_bpe_sample_is_a_sixteenth_of_the_corpus_within_bounds():
    mib = 1 << 20
    assert prep.default_bpe_sample_bytes(10 * mib) == 32 * mib
    assert prep.default_bpe_sample_bytes(500_000_000) == 32 * mib
    assert prep.default_bpe_sample_bytes(2 << 30) == 128 * mib
    assert prep.default_bpe_sample_bytes(100 << 30) == 256 * mib


def test_encode_tasks_run_tokenizers_on_one_thread(tmp_path, monkeypatch, ray_session):
    """One Ray Data encode task per CPU, each with tokenizers' own pool over all cores, put
    N*N threads on N cores (measured: 2 tasks x 2 threads on 2 cores encoded at ~60% of
    2 x 1). A task with one_thread encodes with TOKENIZERS_PARALLELISM=false, restores
    the worker's setting after, and writes the same tokens."""
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(200, 3)))
    ref = prepare_corpus(d, tmp_path / "ref", tokenizer="bpe", vocab_size=300, use_ray=False)
    b = prep._Build(prep.resolve_corpus(str(d)), str(tmp_path / "o1"), "",
                    {"val_fraction": 0.1, "text_field": "text", "segment_bytes": 1 << 20,
                     "skip_bad_files": False}, ray_session, lambda _m: None)
    cpus = int(ray_session.cluster_resources()["CPU"])
    assert b._one_thread(2 * cpus) and not b._one_thread(2 * cpus - 1)
    b.ray = None
    assert not b._one_thread(1000)  # inline: one task, tokenizers uses every core
    seen = []
    real = prep._encode_batch

    def spy(tok, texts):
        seen.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return real(tok, texts)

    monkeypatch.setattr(prep, "_encode_batch", spy)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    rows = prep._piece_rows(b.plan(), b.corpus)
    assert len(rows) == 1
    tok = load_tokenizer(tmp_path / "ref")
    opts = {**b.o, "tok_json": tok.to_str(), "dtype": "uint16", "shard_tokens": 10**9, "seed": 0,
            "unknown": "error", "run": "", "tokenizer": "bpe"}
    for one, out in ((True, "o1"), (False, "o2")):
        seen.clear()
        r = prep._encode_row(rows[0], {**opts, "out": str(tmp_path / out), "one_thread": one})
        assert not r["error"]
        assert seen and set(seen) == {"false" if one else "true"}
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # restored
    for s in ("train", "val"):
        f = json.loads(r["shards"])[s][0][0]
        a1 = pa.ipc.open_file(str(tmp_path / "o1" / f)).read_all().column(0).to_numpy()
        a2 = pa.ipc.open_file(str(tmp_path / "o2" / f)).read_all().column(0).to_numpy()
        assert np.array_equal(a1, a2) and np.array_equal(a1, split_stream(tmp_path / "ref", s))


def test_uri_output_and_training_reads_through_the_node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "c.txt"
    src.write_text("\n".join(make_docs(300, seed=2)), encoding="utf-8")
    uri = f"file://{tmp_path}/remote/data"
    meta = prepare_corpus(src, uri, shard_tokens=4_000)
    assert (tmp_path / "remote" / "data" / "meta.json").is_file()
    names = {x["file"] for s in ("train", "val") for x in meta["shards"][s]}
    assert names == {str(p.relative_to(tmp_path / "remote" / "data"))
                     for p in (tmp_path / "remote" / "data").rglob("*.arrow")}
    local = prepare_corpus(src, tmp_path / "local", shard_tokens=4_000)
    assert local["train_tokens"] == meta["train_tokens"]
    # prepared again into the same URI: the old run's shards are removed after the new meta
    meta2 = prepare_corpus(src, uri, shard_tokens=8_000)
    left = sorted(p.name for p in (tmp_path / "remote" / "data").rglob("*.arrow"))
    assert left == sorted(x["file"].split("/")[-1] for s in ("train", "val") for x in meta2["shards"][s])
    # a loader on the URI reads the same batches as one on a local copy, fetching shards
    # into $RAYGPT_CACHE_DIR only when a window needs them
    a = BatchLoader(uri, "train", 16, 8, seed=4)
    b = BatchLoader(tmp_path / "local", "train", 16, 8, seed=4)
    cached = list((tmp_path / "cache" / "remote").glob("*/train/*.arrow"))
    assert len(cached) < meta2["num_shards"]["train"]
    for step in range(5):
        xa, ya = a.get(step)
        xb, yb = b.get(step)
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    assert read_meta(uri)["train_tokens"] == meta2["train_tokens"]


# ---------------------------------------------------------------- bad input


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.parametrize("case", ["not-utf8", "jsonl-not-json", "jsonl-no-field", "parquet-no-column",
                                  "jsonl-not-utf8"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, case):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(20)))
    if case == "not-utf8":
        bad = d / "bad.txt"
        bad.write_bytes(b"hello\n\xff\xfe world")
        match = r"bad\.txt is not UTF-8: invalid byte 0xff at byte offset 6"
    elif case == "jsonl-not-utf8":
        bad = d / "bad.jsonl"
        bad.write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
        match = r"bad\.jsonl is not UTF-8: invalid byte 0xff \(line 2, byte offset 25\)"
    elif case == "jsonl-not-json":
        bad = d / "bad.jsonl"
        bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
        match = r"bad\.jsonl line 3: not JSON"
    elif case == "jsonl-no-field":
        bad = d / "bad.jsonl"
        bad.write_text('{"text": "one"}\n\n{"body": "two"}\n')
        match = r"bad\.jsonl line 3: no 'text' field \(use --text-field\)"
    else:
        bad = d / "bad.parquet"
        pq.write_table(pa.table({"body": ["x", "y"]}), bad)
        match = r"bad\.parquet has no column 'text' \(columns: body; use --text-field\)"
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as e:
        prepare_corpus(d, out, tokenizer="bpe", vocab_size=300, use_ray=False)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    _no_output(tmp_path, out)
    # --skip-bad-files: the bad file is skipped and counted
    meta = prepare_corpus(d, out, tokenizer="bpe", vocab_size=300, use_ray=False, skip_bad_files=True,
                          val_fraction=0.3)
    assert meta["skipped_files"] == 1 and meta["corpus_files"] == 2


def test_bad_tokenizer_file_and_unreachable_uri(tmp_path, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("hello world\n" * 50)
    notatok = tmp_path / "tokenizer.json"
    notatok.write_text('{"hello": 1}')
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"tokenizer\.json is not a valid tokenizer\.json") as e:
        prepare_corpus(f, out, tokenizer=str(notatok))
    assert "\n" not in str(e.value)
    _no_output(tmp_path, out)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = "s3://bucket/corpus?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1"
    with pytest.raises(UserError, match=r"corpus s3://bucket/corpus.* is unreachable: .*") as e:
        prepare_corpus(uri, out)
    assert "\n" not in str(e.value)
    _no_output(tmp_path, out)


def test_bad_input_found_by_a_ray_worker(tmp_path, ray_session):
    """The error comes from a Ray Data task: still one line naming the file and line,
    nothing at --out; --skip-bad-files reports the count."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"ok{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(40, i)))
    lines = [json.dumps({"text": t}) for t in make_docs(40, 7)]
    lines[30] = '{"text": "unterminated'
    (d / "z.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"z\.jsonl line 31: not JSON") as e:
        prepare_corpus(d, out, tokenizer="char", use_ray=True)
    assert "\n" not in str(e.value)
    _no_output(tmp_path, out)
    meta = prepare_corpus(d, out, tokenizer="char", use_ray=True, skip_bad_files=True)
    assert meta["skipped_files"] == 1
    assert meta["documents"]["train"] + meta["documents"]["val"] == 120


def test_gzipped_text_gives_the_tokens_of_the_text(tmp_path):
    text = "\ufeff" + "\n".join(make_docs(80, seed=11))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "book.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    a = prepare_corpus(tmp_path / "book.txt", tmp_path / "plain", tokenizer="bpe", vocab_size=300)
    b = prepare_corpus(tmp_path / "book.txt.gz", tmp_path / "gz", tokenizer=str(tmp_path / "plain"))
    assert (a["train_tokens"], a["val_tokens"]) == (b["train_tokens"], b["val_tokens"])
    for s in ("train", "val"):
        assert np.array_equal(split_stream(tmp_path / "plain", s), split_stream(tmp_path / "gz", s))
    tok = load_tokenizer(tmp_path / "plain")  # the byte-order mark is not part of the text
    assert tok.decode(split_stream(tmp_path / "plain", "train").tolist()).startswith(text[1:40])


@pytest.mark.slow  # its own Ray in a subprocess: ~20 s idle, ~65 s on a loaded machine
def test_prepare_does_not_join_a_cluster_recorded_on_this_machine(tmp_path):
    """`ray start` records its address in <ray temp dir>/ray_current_cluster, and a bare
    ray.init() joins that cluster: prepare's Ray Data tasks then ran on someone else's
    cluster (seen: another test's `ray start` on this machine). Prepare starts its own
    embedded Ray unless RAY_ADDRESS says otherwise. With BPE it starts that Ray on a thread
    while the driver trains: Ray's processes die with the thread that started them
    (PR_SET_PDEATHSIG), so that thread must outlive the encode (it once did not: GCS
    died as soon as ray.init returned)."""
    import subprocess
    import sys
    import tempfile

    from conftest import free_port

    raytmp = Path(tempfile.mkdtemp(prefix="rgd", dir="/tmp"))  # short: socket paths < 108 B
    try:
        (raytmp / "ray").mkdir()  # Ray's temp dir is $RAY_TMPDIR/ray
        (raytmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nobody there
        d = tmp_path / "c"
        d.mkdir()
        for i in range(2):
            (d / f"{i}.txt").write_text("\n".join(make_docs(30, i)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = str(raytmp)
        code = ("from raygpt.data.prepare import prepare_corpus; import sys; "
                "m = prepare_corpus(sys.argv[1], sys.argv[2], tokenizer='bpe', vocab_size=300, use_ray=True); "
                "print(m['train_tokens'])")
        p = subprocess.run([sys.executable, "-c", code, str(d), str(tmp_path / "out")], env=env,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        assert int(p.stdout.split()[-1]) == read_meta(tmp_path / "out")["train_tokens"] > 0
    finally:
        import shutil

        shutil.rmtree(raytmp, ignore_errors=True)
