"""The chaos timeline's look-up of "the event after this one" goes by order, not by the
rounded time: CI once failed test_replicas when a rejoin and the freeze it released were
logged in the same poll, both at t=26.793, and a `t >=` search took the earlier rejoin."""
from raygpt.train.chaos import Timeline


def test_next_after_goes_by_order_when_times_are_equal():
    tl = Timeline(t0=0.0)
    tl.events += [{"t": 26.793, "event": "replica rejoined", "replica": 2},
                  {"t": 26.793, "event": "failure injected: worker frozen", "rank": 1},
                  {"t": 31.2, "event": "survivors stepped"},
                  {"t": 33.686, "event": "replica rejoined", "replica": 1}]
    hit = tl.events[1]
    assert tl.next_after(hit, "replica rejoined")["replica"] == 1
    assert tl.next_after(hit, "survivors stepped")["t"] == 31.2
    assert tl.next_after(tl.events[3], "replica rejoined") is None


def test_next_after_with_events_logged_by_add():
    tl = Timeline()
    first = tl.add("replica rejoined", replica=2)
    hit = tl.add("failure injected: worker frozen", rank=1)
    tl.add("replica rejoined", replica=1)
    assert tl.next_after(first, "replica rejoined")["replica"] == 1
    assert tl.next_after(hit, "replica rejoined")["replica"] == 1
