"""Sampling: per-row logit processing (mask, bias, penalties, min_p), one token per row
with each row's own parameters, and log-probabilities. Everything stays on the device
until `step` reads the sampled tokens and their logprobs back in one transfer
(`transfer.read_host`)."""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch

from raygpt.serving import transfer
from raygpt.serving.request import Request, SamplingParams, TokenLogprob

log = logging.getLogger("raygpt.serving.engine")


class _DenseRow:
    """One request's per-token vectors on the engine's device: the logit bias, counts of
    its generated tokens (presence/frequency penalties) and the tokens seen in prompt or
    output (repetition penalty). Built on first use, then updated one token at a time."""

    @staticmethod
    def wanted(p: SamplingParams) -> bool:
        return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty
                    or p.repetition_penalty != 1.0 or (p.min_p > 0 and not p.greedy))

    def __init__(self, r: "Request", vocab: int, device, bias: torch.Tensor | None = None):
        """bias: the (V,) vector of r's logit_bias (Sampler.bias_vector), never modified."""
        p = r.params
        self.bias, self.counts, self.seen = bias, None, None
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
            if r.counts:
                self.counts[transfer.to_device(list(r.counts), torch.long, device)] = transfer.to_device(
                    [float(c) for c in r.counts.values()], torch.float32, device)
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[transfer.to_device(r.prompt_ids + r.generated, torch.long, device)] = True

    def add(self, tok: int) -> None:
        if self.counts is not None:
            self.counts[tok] += 1
        if self.seen is not None:
            self.seen[tok] = True

    def apply(self, row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        if self.bias is not None:
            row = row + self.bias
        if self.counts is not None:
            row = row - self.counts * p.frequency_penalty - (self.counts > 0) * p.presence_penalty
        if self.seen is not None:
            rp = p.repetition_penalty
            row = torch.where(self.seen, torch.where(row > 0, row / rp, row * rp), row)
        if p.min_p > 0 and not p.greedy:
            # p_i < min_p * p_max  <=>  logit_i < logit_max + T * ln(min_p)
            row = row.masked_fill(row < row.max() + p.temperature * math.log(p.min_p), float("-inf"))
        return row


class Sampler:
    """Turns a batch's logits into tokens. vocab_mask: (V,) bool of ids never sampled
    (a padded vocabulary), or None."""

    def __init__(self, vocab_mask: torch.Tensor | None):
        self.vocab_mask = vocab_mask
        self._last_bias: tuple[dict | None, torch.Tensor | None] = (None, None)

    def bias_vector(self, bias: dict[int, float] | None, vocab: int, device) -> torch.Tensor | None:
        """The (V,) vector of a logit_bias dict. Built in C loops (numpy.fromiter, scatter_),
        and the last one is kept: a request's n choices share one dict
        (adapter.choice_params), so a full-vocabulary bias (~16 ms per row through Python
        lists) is built once per request, in the step that admits it."""
        if not bias:
            return None
        last, vec = self._last_bias
        if last is not bias:
            ids = torch.from_numpy(np.fromiter(bias.keys(), np.int64, len(bias)))
            vals = torch.from_numpy(np.fromiter(bias.values(), np.float32, len(bias)))
            vec = torch.zeros(vocab).scatter_(0, ids, vals)
            vec = transfer.to_device(vec, torch.float32, device)
            self._last_bias = (bias, vec)
        return vec

    @staticmethod
    def build_mask(vocab_size: int, device, tokenizer=None, real_vocab_size: int | None = None,
                   extra: torch.Tensor | None = None) -> torch.Tensor | None:
        mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        for n in (tok_vocab, real_vocab_size):
            if n is not None and n < vocab_size:
                mask[n:] = True
        if extra is not None:
            mask |= extra.to(device, torch.bool)
        return mask if bool(mask.any()) else None  # once, at construction

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_mask is not None:
            logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        return logits

    def record_prompt_logprobs(self, r: Request, logits: torch.Tensor) -> None:
        """logits (n, V) of a chunk: position j predicts prompt token prefilled + j + 1.
        One device->host transfer for the chunk."""
        m = min(logits.shape[0], len(r.prompt_ids) - 1 - r.prefilled)
        if m <= 0:
            return
        lp = torch.log_softmax(self.mask(logits[:m].float()), dim=-1)
        k = r.params.logprobs or 0
        toks = r.prompt_ids[r.prefilled + 1:r.prefilled + 1 + m]
        idx = transfer.to_device(toks, torch.long, lp.device)
        parts = [lp.gather(1, idx[:, None])[:, 0].double()]
        if k > 0:
            v, i = torch.topk(lp, k)
            parts += [i.double().flatten(), v.double().flatten()]
        flat = transfer.read_host(torch.cat(parts))
        for j, tok in enumerate(toks):
            top = []
            if k > 0:
                ids, vals = flat[m + j * k:m + (j + 1) * k], flat[m + m * k + j * k:m + m * k + (j + 1) * k]
                top = [(int(a), b) for a, b in zip(ids, vals)]
            r.prompt_logprobs.append(TokenLogprob(tok, flat[j], top))

    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Mask, logit_bias, presence/frequency penalties (OpenAI's definitions),
        repetition penalty and min_p (vLLM's). A request's vectors are built once and
        kept up to date as tokens come (a full-vocabulary bias costs one add per step)."""
        logits = self.mask(logits.float()).clone()  # never modify the caller's tensor
        for i, r in enumerate(reqs):
            if _DenseRow.wanted(r.params):
                if r.dense is None:
                    V, dev = logits.shape[-1], logits.device
                    r.dense = _DenseRow(r, V, dev, self.bias_vector(r.params.logit_bias, V, dev))
                logits[i] = r.dense.apply(logits[i], r.params)
        return logits

    def sample(self, logits: torch.Tensor, reqs: list[Request]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B,V) processed -> ((B,) token ids, (B,) bool "the row's distribution was
        valid" or None when every row is greedy), on the device, each row with its own
        parameters. Unseeded rows with the same parameters are sampled together; a seeded
        row uses its own generator, so its tokens do not depend on the batch."""
        dev = logits.device
        if all(r.params.greedy for r in reqs):
            return logits.argmax(dim=-1), None
        out = torch.empty(len(reqs), dtype=torch.long, device=dev)
        ok = torch.ones(len(reqs), dtype=torch.bool, device=dev)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if greedy:
            g = transfer.to_device(greedy, torch.long, dev)
            out[g] = logits[g].argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            p = r.params
            if p.greedy:
                continue
            if r.generator is not None:
                out[i:i + 1], ok[i:i + 1] = draw(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                                 r.generator)
            else:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temp, top_k, top_p), rows in groups.items():
            if len(rows) == len(reqs):
                return draw(logits, temp, top_k, top_p)
            g = transfer.to_device(rows, torch.long, dev)
            out[g], ok[g] = draw(logits[g], temp, top_k, top_p)
        return out, ok

    def read(self, sampled: tuple[torch.Tensor, torch.Tensor | None], logits: torch.Tensor,
             reqs: list[Request]) -> tuple[list[int | None], list[TokenLogprob | None], list[int]]:
        """The sampled tokens, whether each row's distribution was valid and, for rows
        that asked, their logprob and top-k, packed into one tensor and read back in one
        transfer (ids are exact in float64). -> (tokens, logprobs, rows whose
        distribution was invalid: their token is None)."""
        toks, ok = sampled
        B = len(reqs)
        rows = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        parts = [toks.double()] + ([ok.double()] if ok is not None else [])
        k = 0
        if rows:
            k = max(reqs[i].params.logprobs for i in rows)
            g = transfer.to_device(rows, torch.long, logits.device)
            ls = torch.log_softmax(logits[g], dim=-1)
            parts.append(ls.gather(1, toks[g][:, None])[:, 0].double())
            if k > 0:
                v, i = torch.topk(ls, k)
                parts += [i.double().flatten(), v.double().flatten()]
        flat = transfer.read_host(torch.cat(parts) if len(parts) > 1 else parts[0])
        tokens: list[int | None] = [int(t) for t in flat[:B]]
        bad = []
        if ok is not None:
            bad = [i for i in range(B) if not flat[B + i]]
            flat = flat[B:]
        lps: list[TokenLogprob | None] = [None] * B
        R = len(rows)
        for j, i in enumerate(rows):
            kr = reqs[i].params.logprobs
            ids = flat[B + R + j * k:B + R + j * k + kr]
            vals = flat[B + R + R * k + j * k:B + R + R * k + j * k + kr]
            lps[i] = TokenLogprob(tokens[i], flat[B + j], [(int(a), b) for a, b in zip(ids, vals)])
        for i in bad:
            tokens[i] = lps[i] = None
        return tokens, lps, bad

    def step(self, raw: torch.Tensor, reqs: list[Request],
             fail: Callable[[list[Request], BaseException], None]
             ) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """raw logits (B,V) -> one token (and logprob, when asked for) per row, read back in
        one transfer. A row whose sampling fails ends alone (`fail`) and gets None: a
        distribution that is not one (inf, nan) is flagged on the device and read with
        the tokens; an exception redoes the batch row by row (the error path)."""
        try:
            logits = self.process(raw, reqs)
            toks, lps, bad = self.read(self.sample(logits, reqs), logits, reqs)
        except Exception:  # isolate: sample each row on its own
            toks, lps, bad = [], [], []
            for i, r in enumerate(reqs):
                try:
                    logits = self.process(raw[i:i + 1], [r])
                    (t,), (lp,), b = self.read(self.sample(logits, [r]), logits, [r])
                except Exception as e:
                    log.warning("sampling failed for one request: %s", e)
                    fail([r], e)
                    t, lp = None, None
                else:
                    if b:
                        bad.append(i)
                toks.append(t)
                lps.append(lp)
        for i in bad:
            log.warning("sampling failed for one request: invalid distribution")
            fail([reqs[i]], ValueError("probability tensor contains either inf, nan or element < 0"))
        return toks, lps


def draw(logits: torch.Tensor, temperature: float, top_k: int | None = None,
         top_p: float | None = None, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT's sample_next without a device read: (B,V) -> ((B,) token ids, (B,) bool valid).
    torch.multinomial(probs, 1) reads back whether probs is a distribution (a sync per
    call on a GPU); this draws the same token from the same generator state (multinomial's
    own one-sample path: argmax(p / q), q ~ Exp(1)) and leaves the check on the device."""
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, -1:], float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        p = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps >= 1 token).
        drop = (p.cumsum(dim=-1) - p) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    ok = (probs.amax(dim=-1) < float("inf")) & (probs.amin(dim=-1) >= 0)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(dim=-1), ok
