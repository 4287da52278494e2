"""Tokenizers: char and byte-level BPE round trips, vocab sizes, save/load, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raygpt.data.prepare import bundled_corpus_path
from raygpt.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    split_at_pretoken_boundaries,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from raygpt.errors import UserError

NON_ASCII = "naïve café — 日本語 🙂\nЗдравствуй, мир! ½ ∑ x² «quote»\t\n\n  end "


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return bundled_corpus_path().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(shakespeare) -> BPETokenizer:
    return train_bpe_tokenizer([shakespeare[:300_000]], vocab_size=400)


def test_char_shakespeare_vocab_and_round_trip(shakespeare):
    tok = train_char_tokenizer(shakespeare)
    assert tok.kind == "char" and tok.eos_id is None
    assert tok.vocab_size == 65  # nanoGPT's shakespeare_char
    assert tok.chars == sorted(set(shakespeare))
    sample = shakespeare[:5000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and max(ids) < 65
    assert tok.decode(ids) == sample
    # the vectorized encoder used by prepare agrees with the reference one
    assert np.array_equal(tok.encode_np(shakespeare), np.asarray(tok.encode(shakespeare)))


def test_char_non_ascii_round_trip():
    tok = train_char_tokenizer(NON_ASCII)
    ids = tok.encode(NON_ASCII)
    assert len(ids) == len(NON_ASCII)
    assert tok.decode(ids) == NON_ASCII
    assert tok.decode(tok.encode_np(NON_ASCII).tolist()) == NON_ASCII


def test_char_unknown_character_is_a_user_error():
    tok = train_char_tokenizer("abc")
    with pytest.raises(UserError, match="'🙂'"):
        tok.encode("ab🙂")
    with pytest.raises(UserError, match="'z'"):
        tok.encode_np("abcz")
    with pytest.raises(UserError, match="token id 3"):
        tok.decode([0, 3])


def test_bpe_vocab_size_honored_and_round_trip(bpe, shakespeare):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 400
    assert bpe.eos_id is not None and 0 <= bpe.eos_id < 400
    sample = shakespeare[-3000:]
    ids = bpe.encode(sample)
    assert len(ids) < len(sample) * 0.7  # merges learned: fewer tokens than bytes
    assert max(ids) < 400
    assert bpe.decode(ids) == sample


def test_bpe_round_trips_unseen_non_ascii(bpe):
    # trained on English only: byte-level BPE still round-trips any UTF-8 text
    ids = bpe.encode(NON_ASCII)
    assert bpe.decode(ids) == NON_ASCII
    assert len(ids) >= len(NON_ASCII.encode("utf-8")) * 0.5


def test_bpe_trained_on_non_ascii_text():
    text = (NON_ASCII * 50) + "日本語のテキスト、 naïve café " * 50
    tok = train_bpe_tokenizer([text], vocab_size=300)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("日本語")) < len("日本語".encode("utf-8"))  # merged


def test_bpe_vocab_too_small():
    with pytest.raises(UserError, match="vocab_size=100"):
        train_bpe_tokenizer(["hello"], vocab_size=100)


def test_bpe_chunked_encode_equals_whole(bpe, shakespeare):
    text = shakespeare[:200_000]
    chunks = split_at_pretoken_boundaries(text, 5_000)
    assert len(chunks) > 10 and "".join(chunks) == text
    assert np.array_equal(bpe.encode_np(text, chunk_chars=5_000), np.asarray(bpe.encode(text)))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind, bpe):
    tok = train_char_tokenizer(NON_ASCII) if kind == "char" else bpe
    written = tok.save(tmp_path)  # a directory -> tokenizer.json inside
    assert written == tmp_path / "tokenizer.json"
    data = json.loads(written.read_text(encoding="utf-8"))
    if kind == "char":
        assert data["type"] == "char"
    else:
        assert data["model"]["type"] == "BPE"  # the HF tokenizers format
    for src in (tmp_path, written):
        loaded = load_tokenizer(src)
        assert type(loaded) is type(tok)
        assert loaded.kind == kind
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.eos_id == tok.eos_id
        assert loaded.encode(NON_ASCII) == tok.encode(NON_ASCII)
        assert loaded.decode(loaded.encode(NON_ASCII)) == NON_ASCII
    other = tok.save(tmp_path / "sub" / "tok.json")  # an explicit file name
    assert other.is_file() and load_tokenizer(other).vocab_size == tok.vocab_size


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(bad)
    assert isinstance(load_tokenizer(CharTokenizer("xy").save(tmp_path / "c")), CharTokenizer)
