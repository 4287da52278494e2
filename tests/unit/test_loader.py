"""BatchLoader: world-size invariance, determinism, shifted targets, memory mapping, errors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from raygpt.data.loader import BatchLoader, TokenSplit
from raygpt.data.prepare import prepare_corpus
from raygpt.errors import UserError

BLOCK = 32
G = 8


@pytest.fixture(scope="module")
def multi_shard_data(tmp_path_factory):
    """Bundled corpus again, cut into many small shards (cross-shard windows)."""
    out = tmp_path_factory.mktemp("data") / "shards"
    meta = prepare_corpus(None, out, tokenizer="char", shard_tokens=50_000)
    assert meta["num_shards"]["train"] > 10
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_world_size_invariance(char_data, split):
    ref = BatchLoader(char_data, split, BLOCK, G, seed=1337)
    for step in (0, 1, 2, 7, 1000):
        x1, y1 = ref.get(step)
        assert x1.shape == y1.shape == (G, BLOCK)
        for w in (2, 4):
            parts = [BatchLoader(char_data, split, BLOCK, G, seed=1337, dp_rank=r, dp_size=w).get(step)
                     for r in range(w)]
            for x, y in parts:
                assert x.shape == (G // w, BLOCK)
            assert torch.equal(torch.cat([p[0] for p in parts]), x1)
            assert torch.equal(torch.cat([p[1] for p in parts]), y1)


def test_deterministic_and_steps_differ(char_data):
    a = BatchLoader(char_data, "train", BLOCK, G, seed=1)
    b = BatchLoader(char_data, "train", BLOCK, G, seed=1)
    for step in range(5):
        xa, ya = a.get(step)
        xb, yb = b.get(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.get(0)[0], a.get(1)[0])
    assert not torch.equal(a.get(3)[0], a.get(4)[0])
    assert not torch.equal(a.get(0)[0], BatchLoader(char_data, "train", BLOCK, G, seed=2).get(0)[0])
    # train and val batches for the same step come from different streams and data
    assert not np.array_equal(a.global_starts(0), BatchLoader(char_data, "val", BLOCK, G, seed=1).global_starts(0))
    # asking for the same step again (a restart) gives the same batch
    assert torch.equal(a.get(2)[0], a.get(2)[0])


def test_targets_are_inputs_shifted_by_one(char_data):
    ld = BatchLoader(char_data, "train", BLOCK, G, seed=3)
    x, y = ld.get(5)
    assert x.dtype == y.dtype == torch.long and x.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = TokenSplit(char_data, "train")
    for row, start in enumerate(ld.global_starts(5)):
        assert 0 <= start <= tokens.num_tokens - BLOCK - 1
        window = torch.from_numpy(tokens.read(start, BLOCK + 1).astype(np.int64))
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])
    assert int(x.max()) < 65 and int(x.min()) >= 0


def test_multi_shard_reads_match_single_shard(char_data, multi_shard_data):
    one = TokenSplit(char_data, "train")
    many = TokenSplit(multi_shard_data, "train")
    assert len(many.shards) > 10 and one.num_tokens == many.num_tokens
    for start, length in ((0, 10), (49_990, 20), (99_999, 100_002), (one.num_tokens - 5, 5)):
        assert np.array_equal(one.read(start, length), many.read(start, length))
    a = BatchLoader(char_data, "train", BLOCK, 64, seed=9)
    b = BatchLoader(multi_shard_data, "train", BLOCK, 64, seed=9, dp_rank=1, dp_size=2)
    assert torch.equal(a.get(3)[0][32:], b.get(3)[0])
    with pytest.raises(IndexError):
        many.read(many.num_tokens - 1, 2)


def test_memory_mapped_zero_copy(char_data):
    ts = TokenSplit(char_data, "train")
    assert ts.num_tokens == 1_003_854 and ts.dtype == np.uint16
    arr = ts._shard(0)[0][0]
    assert not arr.flags.owndata and not arr.flags.writeable  # a view of the mapped file
    view = ts.read(1000, 50)
    assert np.shares_memory(view, arr)  # no copy inside a shard
    clone = pickle.loads(pickle.dumps(ts))  # reopens the maps, does not ship the data
    assert len(pickle.dumps(ts)) < 1000
    assert np.array_equal(clone.read(123, 456), ts.read(123, 456))


def test_get_micro(char_data):
    ld = BatchLoader(char_data, "train", BLOCK, 12, seed=0, dp_rank=1, dp_size=2)
    x, y = ld.get(4)
    chunks = ld.get_micro(4, 2)
    assert len(chunks) == 3 and all(c[0].shape == (2, BLOCK) for c in chunks)
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert len(ld.get_micro(4, 6)) == 1
    with pytest.raises(UserError, match="train.micro_batch=4"):
        ld.get_micro(4, 4)


def test_errors(char_data, tmp_path):
    with pytest.raises(UserError, match=r"train.global_batch=10 is not divisible .* size 4"):
        BatchLoader(char_data, "train", BLOCK, 10, seed=0, dp_rank=0, dp_size=4)
    with pytest.raises(UserError, match="rank 2"):
        BatchLoader(char_data, "train", BLOCK, 8, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(UserError, match="no 'train' shards"):
        BatchLoader(tmp_path, "train", BLOCK, 8, seed=0)
    small = tmp_path / "small"
    src = tmp_path / "s.txt"
    src.write_text("0123456789" * 20)  # 200 tokens: val gets 20
    prepare_corpus(src, small)
    BatchLoader(small, "val", 19, 4, seed=0).get(0)  # 19 + 1 tokens fit exactly
    with pytest.raises(UserError, match=r"model.block_size=20 is larger than the data split 'val' .*\(20 tokens\)"):
        BatchLoader(small, "val", 20, 4, seed=0)


# ---------------------------------------------------------------- epoch sampling


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("epoch")
    (d / "c.txt").write_text("".join(chr(97 + (i * 7) % 26) for i in range(4_000)))
    prepare_corpus(d / "c.txt", d / "out", tokenizer="char", shard_tokens=700)  # 6 shards
    return d / "out"


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_sampling_visits_every_window_once_per_epoch(small_data, world):
    g, block = 12, 16
    loaders = [BatchLoader(small_data, "train", block, g, seed=5, dp_rank=r, dp_size=world,
                           sampling="epoch") for r in range(world)]
    w = loaders[0].epoch_windows
    assert w == (loaders[0].num_tokens - 1) // block and w % g != 0  # epochs end mid-step
    steps = -(-3 * w // g)
    seen = np.concatenate([np.concatenate([ld.local_starts(s) for ld in loaders]) for s in range(steps)])
    for e in range(3):
        epoch = seen[e * w:(e + 1) * w]
        assert sorted(epoch.tolist()) == [i * block for i in range(w)]  # each window once
    assert not np.array_equal(seen[:w], seen[w:2 * w])  # a new permutation each epoch
    # the rows a rank gets are its slice of the same global batch as at world size 1
    ref = BatchLoader(small_data, "train", block, g, seed=5, sampling="epoch")
    for s in (0, 3, steps - 1):
        x = torch.cat([ld.get(s)[0] for ld in loaders])
        assert torch.equal(x, ref.get(s)[0])
        assert ref.position(s) == {"sampling": "epoch", "epoch": s * g // w, "window": s * g % w,
                                   "windows_per_epoch": w}


def test_epoch_sampling_resumes_mid_epoch_exactly(small_data):
    run = BatchLoader(small_data, "train", 16, 12, seed=7, sampling="epoch")
    first = [run.get(s) for s in range(40)]
    resumed = BatchLoader(small_data, "train", 16, 12, seed=7, sampling="epoch")  # a restart at 25
    assert resumed.position(25)["epoch"] == 1 and resumed.position(25)["window"] > 0
    for s in range(25, 40):
        x, y = resumed.get(s)
        assert torch.equal(x, first[s][0]) and torch.equal(y, first[s][1])
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_prefetch_gives_the_same_batches(small_data):
    a = BatchLoader(small_data, "train", 16, 8, seed=1, prefetch=True)
    b = BatchLoader(small_data, "train", 16, 8, seed=1, prefetch=False)
    for s in (0, 1, 2, 5, 6, 2):  # in order, a jump, and back
        assert torch.equal(a.get(s)[0], b.get(s)[0])
    assert not a.pin_memory or torch.cuda.is_available()
    with pytest.raises(UserError, match="data.sampling='shuffle'"):
        BatchLoader(small_data, "train", 16, 8, seed=1, sampling="shuffle")
