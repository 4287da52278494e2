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

    def admit(self) -> None:
        """Waiting requests into free slots, oldest first."""
        while self.waiting and self.free_slots:
            r = self.waiting.pop(0)
            r.slot = heapq.heappop(self.free_slots)
            self.prefilling.append(r)

    def release(self, r: Request) -> None:
        if r.slot is not None:
            heapq.heappush(self.free_slots, r.slot)
            r.slot = None

    def reap(self) -> None:
        """Cancelled requests end; finished ones leave and free their slots."""
        for lst in (self.active, self.prefilling):
            keep = []
            for r in lst:
                if r.cancelled and not r.done:
                    r._put(Event(finish_reason="cancelled"))
                if r.done:
                    self.release(r)
                else:
                    keep.append(r)
            lst[:] = keep

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
            if r.done:
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
