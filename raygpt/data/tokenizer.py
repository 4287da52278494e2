"""Tokenizers: character-level and byte-level BPE (HF `tokenizers`), saved as `tokenizer.json`.

Both kinds share one small interface used by prepare, training and serving:

    tok.encode(text) -> list[int]        tok.decode(ids) -> str
    tok.vocab_size   tok.kind ("char"|"bpe")   tok.eos_id (int | None)
    tok.save(path)   (a directory -> path/tokenizer.json, else the file itself)

`encode_np(text)` returns the ids as a numpy array (fast path for `raygpt prepare`).

Char: the sorted set of characters of the training text (nanoGPT: 65 for tinyshakespeare);
saved as `{"type": "char", "version": 1, "chars": [...]}`. Encoding a character outside
the vocabulary raises a UserError naming it. No end-of-text token (eos_id is None).

BPE: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer with the GPT-2 split regex,
ByteLevel decoder), trained offline; it round-trips any UTF-8 text. One special token,
`<|endoftext|>` (eos_id), separates documents. Saved as the HF tokenizers JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from raygpt.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
# Byte-level BPE needs the 256 byte symbols plus <|endoftext|>.
MIN_BPE_VOCAB = 257


def _target(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir() or (not p.suffix and not p.exists()):
        return p / TOKENIZER_FILE
    return p


class CharTokenizer:
    kind = "char"
    eos_id: int | None = None

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        if not chars:
            raise UserError("char tokenizer: the training text is empty")
        for c in chars:
            if len(c) != 1:
                raise UserError(f"char tokenizer: vocabulary entry {c!r} is not a single character")
        self.chars: list[str] = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # Sorted code points -> ids, for the vectorized encoder.
        self._codes = np.fromiter((ord(c) for c in chars), dtype=np.uint32, count=len(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _unknown(self, ch: str) -> UserError:
        return UserError(
            f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's vocabulary "
            f"({self.vocab_size} characters)"
        )

    def encode_np(self, text: str) -> np.ndarray:
        """ids as an int64 numpy array (vectorized; ~100x faster than a dict lookup per char)."""
        if not text:
            return np.zeros(0, dtype=np.int64)
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids_c = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_c] != codes
        if bad.any():
            raise self._unknown(chr(int(codes[np.argmax(bad)])))
        return ids.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise self._unknown(e.args[0]) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars, n = self.chars, len(self.chars)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise UserError(f"token id {i} is outside the char vocabulary (0..{n - 1})")
            out.append(chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "char", "version": 1, "chars": self.chars}

    def save(self, path: str | os.PathLike) -> Path:
        target = _target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        return target

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok):  # tok: tokenizers.Tokenizer
        self.tok = tok
        self.eos_id: int | None = tok.token_to_id(EOS_TOKEN)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_np(self, text: str, chunk_chars: int = 1 << 20) -> np.ndarray:
        """ids as an int64 array. Long texts are cut at pre-token boundaries (after a newline
        that is followed by a non-space character: the GPT-2 split regex always breaks there)
        and encoded in parallel by `encode_batch`; the result equals `encode(text)`."""
        chunks = split_at_pretoken_boundaries(text, chunk_chars)
        if len(chunks) == 1:
            return np.asarray(self.encode(text), dtype=np.int64)
        encs = self.tok.encode_batch(chunks, add_special_tokens=False)
        if not encs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise UserError(f"token id {i} is outside the BPE vocabulary (0..{n - 1})")
        return self.tok.decode(ids, skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tok.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        target = _target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.tok.to_str() + "\n", encoding="utf-8")
        return target

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | BPETokenizer

_BOUNDARY = re.compile(r"\n(?=\S)")


def split_at_pretoken_boundaries(text: str, chunk_chars: int) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` at positions right after a newline that
    is followed by a non-whitespace character (a pre-token boundary for byte-level BPE)."""
    if len(text) <= chunk_chars:
        return [text]
    out, start = [], 0
    while len(text) - start > chunk_chars:
        m = _BOUNDARY.search(text, start + chunk_chars)
        if m is None:
            break
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


def train_char_tokenizer(text: str) -> CharTokenizer:
    """Vocabulary = the sorted set of characters in `text`."""
    return CharTokenizer(set(text))


def _bpe_skeleton():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Byte-level BPE trained offline on `texts` (an iterable of documents or chunks).

    The vocabulary is the 256 byte symbols + `<|endoftext|>` + merges up to `vocab_size`
    (fewer when the text runs out of pairs to merge)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"BPE vocab_size={vocab_size} is too small: it needs at least "
                        f"{MIN_BPE_VOCAB} (256 bytes + {EOS_TOKEN})")
    tok = _bpe_skeleton()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if isinstance(texts, str):
        texts = [texts]
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def tokenizer_from_json(data: str | dict) -> Tokenizer:
    """Build a tokenizer from the contents of a tokenizer.json (either kind)."""
    obj = json.loads(data) if isinstance(data, str) else data
    if isinstance(obj, dict) and obj.get("type") == "char":
        return CharTokenizer(obj["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(data if isinstance(data, str) else json.dumps(data)))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json of either kind; `path` is the file or a directory holding it."""
    p = Path(path)
    target = p / TOKENIZER_FILE if p.is_dir() else p
    if not target.is_file():
        raise UserError(f"no tokenizer at {target}")
    try:
        text = target.read_text(encoding="utf-8")
        return tokenizer_from_json(text)
    except UserError:
        raise
    except Exception as e:  # bad JSON, not a tokenizer, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{target} is not a valid tokenizer.json: {msg}") from None


# ----------------------------------------------------------------------------- same tokenizer?


def _tokenizer_file(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    return p / TOKENIZER_FILE if p.is_dir() else p


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """Hash of a tokenizer.json's content (formatting-independent)."""
    f = _tokenizer_file(path)
    if not f.is_file():
        raise UserError(f"no tokenizer at {f}")
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{f} is not valid JSON: {e}") from None
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def same_tokenizer(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def check_same_tokenizer(model_dir: str | os.PathLike, data_dir: str | os.PathLike,
                         what: str = "model") -> None:
    """UserError unless the data directory was encoded with the model's tokenizer."""
    mt, dt = _tokenizer_file(model_dir), _tokenizer_file(data_dir)
    if not mt.is_file():
        raise UserError(f"{what} directory {model_dir} has no {TOKENIZER_FILE}")
    if not dt.is_file():
        raise UserError(f"data directory {data_dir} has no {TOKENIZER_FILE}")
    if not same_tokenizer(mt, dt):
        raise UserError(
            f"data {data_dir} was encoded with another tokenizer than the {what} {model_dir}: "
            f"encode its text with the {what}'s tokenizer (pass the text file or directory "
            f"instead, or `raygpt prepare --tokenizer MODEL_DIR/tokenizer.json`)")
