"""Per-client limits (raygpt.serving.limits), on a clock the test advances."""
from __future__ import annotations

import pytest

from raygpt.serving.limits import (ConcurrencyLimiter, RateLimiter, TokenBucket,
                                   TooManyConcurrent)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_cost_above_burst_is_charged_in_full():
    """rate 10/s, burst 10, requests of 41 tokens: the old min(cost, burst) charge let one
    through every second (410 tokens/s); in full, one per 4.1 s (the rate)."""
    clock = Clock()
    b = TokenBucket(rate=10, burst=10, clock=clock)
    assert b.take(41) == 0  # a full bucket admits it ...
    assert b.tokens == -31  # ... and goes into debt
    clock.t += 1.0  # the old bucket was full again here
    assert b.take(41) == pytest.approx((10 + 21) / 10)
    clock.t += 3.1 - 1e-9
    assert b.take(41) > 0
    clock.t += 1e-6
    assert b.take(41) == 0
    # over a long run the client gets the rate, not cost/burst times it
    served, t_end = 0, clock.t + 100
    while clock.t < t_end:
        if b.take(41) == 0:
            served += 41
        clock.t += 0.05
    assert served <= 10 * 100 + 10 + 41


def test_small_costs_unchanged():
    clock = Clock()
    b = TokenBucket(rate=2, burst=3, clock=clock)
    assert [b.take() for _ in range(3)] == [0, 0, 0]
    assert b.take() == pytest.approx(0.5)
    clock.t += 0.5
    assert b.take() == 0


def test_limiter_state_is_bounded_under_an_address_spray():
    clock = Clock()
    lim = RateLimiter(rate=1, burst=5, max_clients=100, clock=clock)
    for i in range(10_000):  # every address spends a token: none of the buckets is full
        assert lim.check(f"ip:10.{i}") == 0
        clock.t += 0.001
    assert len(lim.buckets) == 100
    # a client in use is not the one evicted (least recently used goes first)
    lim.check("ip:me", 5)
    for i in range(99):
        lim.check(f"ip:spray{i}")
    assert lim.check("ip:me") > 0  # still remembered, still empty
    assert len(lim.buckets) == 100


def test_limiter_off_keeps_no_state():
    lim = RateLimiter(rate=0, burst=None)
    assert all(lim.check(f"c{i}", 10**9) == 0 for i in range(1000))
    assert not lim.buckets


def test_concurrency_cap_per_client():
    c = ConcurrencyLimiter(2)
    r1, r2 = c.acquire("a"), c.acquire("a")
    with pytest.raises(TooManyConcurrent):
        c.acquire("a")
    rb = c.acquire("b")  # another client has its own count
    r1()
    r1()  # idempotent: a double release frees one slot only
    r3 = c.acquire("a")
    with pytest.raises(TooManyConcurrent):
        c.acquire("a")
    for r in (r2, r3, rb):
        r()
    assert c.inflight == {}  # idle clients leave no entry
    off = ConcurrencyLimiter(None)
    assert [off.acquire("a") for _ in range(100)] and off.inflight == {}
