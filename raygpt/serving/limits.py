"""Per-client limits of the server (pure Python, no Ray, testable on their own).

- `TokenBucket` / `RateLimiter`: requests/s and tokens/s per client. A request that costs
  more than the burst is not cut down to the burst (that let a client pass ~cost/burst
  times the rate): it is admitted only when the client's bucket is full and then charged
  in full, so the bucket goes into debt and the client's next request waits until the
  debt is paid back at `rate`. Over any window a client gets at most burst + rate x time.
- The limiter keeps at most `max_clients` buckets: least recently used first out. A full
  bucket is the same as a new one, so under an address spray only clients idle the
  longest are forgotten (a forgotten client in debt starts over with a full bucket: with
  one bucket per address, a sprayer has that many buckets anyway).
- `ConcurrencyLimiter`: in-flight requests per client (429 beyond the cap); an entry
  exists only while the client has requests in flight.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.t = burst, clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def take(self, cost: float = 1.0) -> float:
        """-> 0 when allowed (and charged in full), else seconds until it would be.
        A cost above the burst needs a full bucket and leaves it in debt (negative)."""
        self._refill()
        need = min(cost, self.burst)
        if self.tokens >= need:
            self.tokens -= cost
            return 0.0
        return (need - self.tokens) / self.rate

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst


class RateLimiter:
    """Token buckets per client (API key when keys are set, else client IP), LRU-bounded."""

    def __init__(self, rate: float, burst: float | None, max_clients: int = 10000,
                 clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst = rate, burst if burst is not None else max(1.0, rate)
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.max_clients, self.clock = max(1, max_clients), clock

    def check(self, client: str, cost: float = 1.0) -> float:
        """-> 0 when allowed (and charged), else seconds to wait (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        b = self.buckets.get(client)
        if b is None:
            while len(self.buckets) >= self.max_clients:
                self.buckets.popitem(last=False)  # the least recently used: O(1) per new client
            b = self.buckets[client] = TokenBucket(self.rate, self.burst, self.clock)
        else:
            self.buckets.move_to_end(client)
        return b.take(cost)


class TooManyConcurrent(Exception):
    pass


class ConcurrencyLimiter:
    """At most `limit` in-flight requests per client (None or 0: no limit)."""

    def __init__(self, limit: int | None):
        self.limit = limit or 0
        self.inflight: dict[str, int] = {}

    def acquire(self, client: str) -> Callable[[], None]:
        """-> a release function (idempotent); raises TooManyConcurrent beyond the cap."""
        if self.limit <= 0:
            return lambda: None
        n = self.inflight.get(client, 0)
        if n >= self.limit:
            raise TooManyConcurrent(client)
        self.inflight[client] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.inflight.get(client, 1) - 1
            if left > 0:
                self.inflight[client] = left
            else:  # no entry for idle clients: the dict holds only who is in flight
                self.inflight.pop(client, None)
        return release
