"""The scheduler: which requests wait, prefill or decode, which cache slot each holds,
and how a step's token budget is split into prefill chunks. Not thread-safe: the engine
calls it holding its lock."""
from __future__ import annotations

import heapq

from raygpt.serving.request import Event, Request


class Scheduler:
    def __init__(self, n_slots: int, block_size: int, step_tokens: int, min_prefill_tokens: int):
        self.block_size = block_size
        self.step_tokens = step_tokens
        self.min_prefill_tokens = min_prefill_tokens
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []   # admitted, prompt not fully in the cache yet
        self.active: list[Request] = []       # decoding
        # A min-heap: the lowest free slot first keeps the running rows' slots packed,
        # so a decode step's rows are often consecutive slots (read in place, no gather).
        self.free_slots = list(range(n_slots))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.active)

    def admit(self) -> list[Request]:
        """Waiting requests into free slots, oldest first. A prompt already being
        prefilled (the n choices of one request, or the same prompt sent twice) is not
        prefilled again: the newcomer follows that request and copies its KV rows when its
        prefill ends (its first token is sampled from the same logits). A prompt already
        decoding elsewhere is copied at once but for its last token, which is prefilled
        (it yields the logits of the first token). -> the requests with such a copy due
        now (`copy_from`)."""
        copies = []
        while self.waiting and self.free_slots:
            r = self.waiting.pop(0)
            r.slot = heapq.heappop(self.free_slots)
            self.prefilling.append(r)
            if r.prompt_logprobs is not None:
                continue  # echo: computes its own prompt logprobs
            src = self._source(r)
            if src is None:
                continue
            if src.prefilled < len(src.prompt_ids):
                r.source = src
                src.followers.append(r)
            elif len(r.prompt_ids) > 1:
                r.copy_from = (src.slot, len(r.prompt_ids) - 1)
                copies.append(r)
        return copies

    def _source(self, r: Request) -> Request | None:
        for q in self.prefilling + self.active:
            if (q is not r and q.source is None and not q.done and not q.cancelled
                    and q.slot is not None and q.prompt_ids == r.prompt_ids):
                return q
        return None

    def release(self, r: Request) -> None:
        if r.slot is not None:
            heapq.heappush(self.free_slots, r.slot)
            r.slot = None

    def reap(self) -> None:
        """Cancelled requests end; finished ones leave and free their slots (followers of a
        request that ends before its prefill does prefill on their own, the first leading)."""
        for lst in (self.active, self.prefilling):
            keep = []
            for r in lst:
                if r.cancelled and not r.done:
                    r._put(Event(finish_reason="cancelled"))
                if r.done:
                    self._orphan(r)
                    self.release(r)
                else:
                    keep.append(r)
            lst[:] = keep

    @staticmethod
    def _orphan(r: Request) -> None:
        live = [f for f in r.followers if not f.done]
        r.followers = []
        if r.source is not None:
            if r in r.source.followers:
                r.source.followers.remove(r)
            r.source = None
        if live:
            lead, rest = live[0], live[1:]
            lead.source, lead.followers = None, rest
            for f in rest:
                f.source = lead

    def followers_done(self, r: Request) -> list[Request]:
        """r's prefill ended: its live followers, now holding the same prompt (detached)."""
        out = [f for f in r.followers if not f.done and f.slot is not None]
        for f in r.followers:
            f.source = None
        r.followers = []
        for f in out:
            f.prefilled = len(f.prompt_ids)
            self.prefilling.remove(f)
        return out

    def compact(self) -> list[tuple[Request, int, int]]:
        """Move decoding rows down into free slots below them, highest first, so that the
        decode batch stays in consecutive slots: forward_cached reads those in place,
        while a batch with holes (left by finished requests) gathers every row's keys and
        values at every layer and step (~15% of a CPU step at 32 rows); a move copies one
        row once. Prefilling rows stay (followers and copies name their slots).
        -> [(request, old slot, new slot)]: the engine copies the KV rows."""
        moves = []
        rows = sorted((r for r in self.active if not r.done and r.slot is not None),
                      key=lambda r: r.slot)
        while rows and self.free_slots and self.free_slots[0] < rows[-1].slot:
            r = rows.pop()
            new = heapq.heappop(self.free_slots)
            heapq.heappush(self.free_slots, r.slot)
            moves.append((r, r.slot, new))
            r.slot = new
            rows.insert(0, r)  # now below the others: not moved again
        return moves

    def decode_batch(self) -> list[Request]:
        # In slot order: consecutive slots let forward_cached read the cache in place.
        return sorted((r for r in self.active if not r.done), key=lambda r: r.slot)

    def prefill_chunks(self) -> list[tuple[Request, int]]:
        """(request, chunk length) within the step's remaining token budget."""
        budget = max(self.step_tokens - len(self.active), self.min_prefill_tokens)
        chunks: list[tuple[Request, int]] = []
        for r in self.prefilling:
            if budget <= 0:
                break
            if r.done or r.source is not None:  # a follower waits for its source's prefill
                continue
            n = min(len(r.prompt_ids) - r.prefilled, budget)
            chunks.append((r, n))
            budget -= n
        return chunks

    def groups(self, chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        """Chunks batched by length, right-padded: padded tokens <= step_tokens, every row's
        padded end inside the context, and prompt-logprob rows (head over every position)
        on their own."""
        groups, cur = [], []
        for r, n in sorted(chunks, key=lambda c: c[1]):
            full = r.prompt_logprobs is not None
            if full:
                groups.append([(r, n)])
                continue
            fits = (len(cur) + 1) * n <= self.step_tokens and all(
                q.prefilled + n <= self.block_size for q, _ in cur + [(r, n)])
            if cur and not fits:
                groups.append(cur)
                cur = []
            cur.append((r, n))
        if cur:
            groups.append(cur)
        return groups
