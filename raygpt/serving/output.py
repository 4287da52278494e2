"""Output processing: incremental detokenization, stop tokens and strings (with the
hold-back of a possible stop-string start), finish reasons, and the events streamed to
each request."""
from __future__ import annotations

import time
from typing import Callable

from raygpt.serving.request import Event, Observer, Request, TokenLogprob


class OutputProcessor:
    """count(tokens, finished): the engine's counters (called once per token)."""

    def __init__(self, tokenizer, block_size: int, observer: Observer,
                 count: Callable[[int, int], None]):
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.block_size = block_size
        self.observer = observer
        self.count = count

    def detok(self, r: Request, final: bool) -> str:
        """New text of r since the last call, decoding a short window of tokens (not the
        whole output): text shows once it no longer ends in an incomplete UTF-8 sequence."""
        toks = r.generated
        prefix = self.tokenizer.decode(toks[r.prefix_offset:r.read_offset])
        new = self.tokenizer.decode(toks[r.prefix_offset:])
        if len(new) > len(prefix) and (final or not new.endswith("\ufffd")):
            r.prefix_offset, r.read_offset = r.read_offset, len(toks)
            return new[len(prefix):]
        return ""

    def finish_without_tokens(self, r: Request) -> None:
        r.finish_reason = "length"
        self.count(0, 1)
        self.observer.finished("length", 0)
        r._put(Event(finish_reason="length"))

    def emit(self, r: Request, tok: int, lp: TokenLogprob | None) -> None:
        """Record a new token of r; stream the text that is safe to show; finish if due."""
        r.stamp(time.perf_counter(), self.observer)
        r.generated.append(tok)
        r.counts[tok] = r.counts.get(tok, 0) + 1
        if r.dense is not None:
            r.dense.add(tok)
        if lp is not None:
            r.logprobs.append(lp)
        p = r.params
        finish = None
        if (self.eos_id is not None and tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            finish = "stop"
            r.generated.pop()  # not part of the text; put back below for the ids
            r.text += self.detok(r, final=True)
            r.generated.append(tok)
        if finish is None:
            last = len(r.generated) >= p.max_tokens or (
                len(r.prompt_ids) + len(r.generated) >= self.block_size)
            r.text += self.detok(r, final=last)
        text = r.text
        cut = len(text)
        if p.stop:
            start = max(0, r.emitted_chars - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                cut, finish = min(hits), "stop"
        if finish is None:
            if len(r.generated) >= p.max_tokens:
                finish = "length"
            elif len(r.prompt_ids) + len(r.generated) >= self.block_size:
                finish = "length"  # the context is full (same rule as GPT.generate)
        if finish is None and p.stop:  # hold back a possible start of a stop string
            hold = 0
            for s in p.stop:
                for k in range(min(len(s) - 1, cut - r.emitted_chars), hold, -1):
                    if text[cut - k:cut] == s[:k]:
                        hold = k
                        break
            cut -= hold
        delta = text[r.emitted_chars:cut] if cut > r.emitted_chars else ""
        r.emitted_chars = max(r.emitted_chars, cut)
        lps = [lp] if lp is not None else []
        if finish is not None:
            r.text = text[:cut]
            r.finish_reason = finish
            self.count(1, 1)
            self.observer.finished(finish, len(r.generated))
            r._put(Event(delta, [tok], finish, logprobs=lps))
        else:
            self.count(1, 0)
            r._put(Event(delta, [tok], logprobs=lps))
