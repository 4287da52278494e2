"""Sampling: per-row logit processing (mask, bias, penalties, min_p), one token per row
with each row's own parameters, and log-probabilities."""
from __future__ import annotations

import math

import torch

from raygpt.model.gpt import sample_next
from raygpt.serving.request import Request, SamplingParams, TokenLogprob


class _DenseRow:
    """One request's per-token vectors on the engine's device: the logit bias, counts of
    its generated tokens (presence/frequency penalties) and the tokens seen in prompt or
    output (repetition penalty). Built on first use, then updated one token at a time."""

    @staticmethod
    def wanted(p: SamplingParams) -> bool:
        return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty
                    or p.repetition_penalty != 1.0 or (p.min_p > 0 and not p.greedy))

    def __init__(self, r: "Request", vocab: int, device):
        p = r.params
        self.bias = self.counts = self.seen = None
        if p.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            self.bias[torch.tensor(list(p.logit_bias), device=device)] = torch.tensor(
                list(p.logit_bias.values()), device=device)
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
            for t, c in r.counts.items():
                self.counts[t] = c
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(r.prompt_ids + r.generated, device=device)] = True

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
        return mask if bool(mask.any()) else None

    def top(self, lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        v, i = torch.topk(lp, k)
        return list(zip(i.tolist(), v.tolist()))

    def record_prompt_logprobs(self, r: Request, logits: torch.Tensor) -> None:
        """logits (n, V) of a chunk: position j predicts prompt token prefilled + j + 1."""
        lp = torch.log_softmax(self.mask(logits.float()), dim=-1)
        k = r.params.logprobs or 0
        start = r.prefilled
        for j in range(logits.shape[0]):
            t = start + j + 1
            if t >= len(r.prompt_ids):
                break
            tok = r.prompt_ids[t]
            r.prompt_logprobs.append(TokenLogprob(tok, float(lp[j, tok]), self.top(lp[j], k)))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_mask is not None:
            logits = logits.masked_fill(self.vocab_mask, float("-inf"))
        return logits

    def process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Mask, logit_bias, presence/frequency penalties (OpenAI's definitions),
        repetition penalty and min_p (vLLM's). A request's vectors are built once and
        kept up to date as tokens come (a full-vocabulary bias costs one add per step)."""
        logits = self.mask(logits.float()).clone()  # never modify the caller's tensor
        for i, r in enumerate(reqs):
            if _DenseRow.wanted(r.params):
                if r.dense is None:
                    r.dense = _DenseRow(r, logits.shape[-1], logits.device)
                logits[i] = r.dense.apply(logits[i], r.params)
        return logits

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits (B,V) processed -> one token per row with each row's own parameters.
        Unseeded rows with the same parameters are sampled together; a seeded row uses its
        own generator, so its tokens do not depend on the batch. Raises on a bad row."""
        out: list[int | None] = [None] * len(reqs)
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        if greedy:
            for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist()):
                out[i] = t
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            if out[i] is None:
                p = r.params
                if r.generator is not None:
                    out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                             r.generator)[0])
                else:
                    groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        for (temp, top_k, top_p), rows in groups.items():
            for i, t in zip(rows, sample_next(logits[rows], temp, top_k, top_p).tolist()):
                out[i] = t
        return out  # type: ignore[return-value]
