"""The hang watchdog's judgement (raygpt.train.watchdog) on heartbeat records, with the
clock given: which timeout applies, when a hang is declared, which ranks are named."""
from __future__ import annotations

from pathlib import Path

from raygpt.train.stragglers import StragglerDetector
from raygpt.train.watchdog import HangWatchdog


def _rec(rank, seq, ticks, phase="compute", step=12, steps_done=11, gen="g1", world=2):
    return {"gen": gen, "rank": rank, "world": world, "pid": 100 + rank, "node": "n1", "seq": seq, "phase": phase,
            "step": step, "ticks": ticks, "steps_done": steps_done, "step_s_max": 0.05, "started": 1.0}


def _dog(**kw):
    return HangWatchdog("run", Path("/tmp/run"), kw.pop("hang", None), kw.pop("init", 600.0), **kw)


def _until_verdict(dog, silent: dict, seconds: int, **live):
    """Rank 0 beats once a second (no progress), rank 1 stays `silent`: -> the first
    verdict within `seconds`, or None."""
    dog.check([_rec(0, 1, 50, **live), silent], 0.0)
    for t in range(1, seconds):
        v = dog.check([_rec(0, 1 + t, 50, **live), silent], float(t))
        if v:
            return v
    return None


def test_no_progress_after_the_first_step_is_a_hang_after_the_short_timeout():
    dog = _dog()
    assert dog.check([_rec(0, 1, 10), _rec(1, 1, 10, phase="data", step=13)], 0.0) is None
    for t in range(1, 15):  # both beat, neither moves
        assert dog.check([_rec(0, 1 + t, 10), _rec(1, 1 + t, 10, phase="data", step=13)], float(t)) is None
    v = dog.check([_rec(0, 20, 10), _rec(1, 20, 10, phase="data", step=13)], 15.5)
    assert v is not None and v["timeout_s"] == 15.0
    # rank 0 still computes step 12 while rank 1 waits at step 13: rank 0 holds it up
    assert [s["rank"] for s in v["stuck"]] == [0] and v["reason"] == "behind the others"
    assert dog.check([_rec(0, 21, 10), _rec(1, 21, 10)], 40.0) is None  # judged once per group


def test_a_frozen_rank_is_named_even_when_its_last_record_is_from_before_the_first_step():
    """Steps faster than a beat: the frozen rank's last record still says "init"; the live
    rank's phase decides the timeout, and the rank without heartbeats is named."""
    v = _until_verdict(_dog(), _rec(1, 1, 0, phase="init", step=0, steps_done=0), 20)
    assert v is not None and 10 <= v["idle_s"] <= 11  # FROZEN_S, not the 15 s hang timeout
    assert [s["rank"] for s in v["stuck"]] == [1] and "frozen" in v["reason"]


def test_a_frozen_rank_is_judged_at_frozen_s_even_when_the_hang_timeout_is_longer():
    """Under load the auto timeout grows (20 x the slowest step: 25-38 s in a soak); a
    rank with no heartbeat for FROZEN_S while the others step is judged then. A rank
    that still beats but makes no progress waits for the timeout."""
    v = _until_verdict(_dog(hang=60.0), _rec(1, 1, 50), 70)
    assert v is not None and v["idle_s"] == 10.0 and [s["rank"] for s in v["stuck"]] == [1]
    dog = _dog(hang=60.0)
    for t in range(0, 59):
        assert dog.check([_rec(0, 1 + t, 50), _rec(1, 1 + t, 50)], float(t)) is None


def test_long_phases_get_the_init_timeout_and_progress_resets_the_clock():
    dog = _dog(init=100.0)
    assert dog.check([_rec(0, 1, 5, phase="eval"), _rec(1, 1, 5, phase="eval")], 0.0) is None
    assert dog.check([_rec(0, 60, 5, phase="eval"), _rec(1, 60, 5, phase="eval")], 60.0) is None
    assert dog.check([_rec(0, 61, 6), _rec(1, 61, 6)], 61.0) is None  # moved on
    assert dog.check([_rec(0, 70, 6), _rec(1, 70, 6)], 70.0) is None  # 9 s idle
    assert dog.check([_rec(0, 80, 6), _rec(1, 80, 6)], 77.0) is not None  # 16 s idle > 15 s


def test_a_group_that_is_gone_or_still_starting_is_not_judged():
    dog = _dog()
    dog.check([_rec(0, 1, 5), _rec(1, 1, 5)], 0.0)
    assert dog.check([_rec(0, 1, 5), _rec(1, 1, 5)], 100.0) is None  # no beats at all: Ray's business
    dog2 = _dog()
    assert dog2.check([_rec(0, 1, 5, world=3), _rec(1, 1, 5, world=3)], 0.0) is None
    assert dog2.check([_rec(0, 50, 5, world=3), _rec(1, 50, 5, world=3)], 50.0) is None  # rank 2 never beat


def test_a_restarted_group_is_judged_afresh():
    dog = _dog()
    dog.check([_rec(0, 1, 5), _rec(1, 1, 5)], 0.0)
    assert dog.check([_rec(0, 30, 5), _rec(1, 30, 5)], 30.0) is not None
    new = [{**_rec(0, 1, 1), "gen": "g2", "started": 2.0}, {**_rec(1, 1, 1), "gen": "g2", "started": 2.0}]
    assert dog.check(new, 31.0) is None
    assert dog.check([{**r, "seq": 40} for r in new], 40.0) is None  # 9 s idle in the new group


def test_straggler_detector_flags_a_rank_after_k_slow_steps_and_again_after_it_recovered():
    det = StragglerDetector(factor=1.5, steps=3, nodes=["a", "b", "c"])
    assert det.update(1, [0.1, 0.1, 0.1]) == []
    assert det.update(2, [0.1, 0.2, 0.1]) == []  # 1 slow step of the last 3
    (ev,) = det.update(3, [0.1, 0.2, 0.1])  # 2 of the last 3: the median ratio is 2
    assert ev["rank"] == 1 and ev["node"] == "b" and ev["ratio"] == 2.0 and ev["step"] == 3
    assert det.update(4, [0.1, 0.2, 0.1]) == [] and det.flagged == {1}  # once while it stays slow
    det.update(5, [0.1, 0.1, 0.1])
    assert det.flagged == {1}  # one good step does not clear it ...
    assert det.update(6, [0.1, 0.2, 0.1]) == [] and det.flagged == {1}  # ... nor re-flag it
    det.update(7, [0.1, 0.1, 0.1])
    assert det.flagged == set()  # 2 good steps of the last 3: cleared
    # a single noisy step in a slow streak does not reset it (a busy 2-core machine)
    assert det.update(8, [0.1, 0.1, 0.3]) == []
    assert det.update(9, [0.1, 0.1, 0.1]) == []
    assert [e["rank"] for e in det.update(10, [0.1, 0.1, 0.3])] == [2]



def test_a_rank_whose_beats_stop_while_the_others_save_is_named_after_the_step_timeout():
    """A network partition during a checkpoint: the live rank waits in the save's
    collective (a long phase) but still beats; the silent rank is not given the init
    timeout."""
    v = _until_verdict(_dog(init=600.0), _rec(1, 1, 50), 30, phase="checkpoint")
    assert v is not None and v["timeout_s"] == 15.0 and 15 <= v["idle_s"] <= 16
    assert [s["rank"] for s in v["stuck"]] == [1] and "frozen" in v["reason"]


def _replicas(t: int, frozen_from: int | None = None, stuck_from: int | None = None):
    """Three replicas (own gens, world 1): 0 and 2 step every second; replica 1 beats
    and steps until `frozen_from` (then silent) or `stuck_from` (then beats, no progress)."""
    recs = [_rec(r, 1 + t, 10 * t, step=10 + t, gen=f"g{r}", world=1) for r in (0, 2)]
    t1 = min(x for x in (t, frozen_from, stuck_from) if x is not None)
    seq1 = t if frozen_from is None else min(t, frozen_from)
    recs.append(_rec(1, 1 + seq1, 10 * t1, step=10 + t1, gen="g1", world=1))
    return recs


def test_replica_mode_names_only_the_frozen_replica_and_keeps_judging_the_others():
    from raygpt.train.heartbeat import STALE_BEAT_S
    from raygpt.train.watchdog import ReplicaWatchdog

    dog = ReplicaWatchdog("run", Path("/tmp/run"), 4.0, 600.0)
    verdicts = [(t, dog.check(_replicas(t, frozen_from=5), float(t))) for t in range(0, 30)]
    (t, v), = [(t, v) for t, v in verdicts if v]
    assert t == 5 + STALE_BEAT_S and v["gen"] == "g1" and v["replica"], v
    assert [s["rank"] for s in v["stuck"]] == [1] and v["reason"] == "no heartbeat (process frozen)"
    # its replacement (a new gen for rank 1) is judged afresh; the others never were
    fresh = [_rec(r, 40 + t, 400 + t, gen=f"g{r}", world=1) for r in (0, 2)] + [
        _rec(1, 1 + t, 1, phase="init", steps_done=0, gen="g1b", world=1) for _ in [0]]
    for t in range(5):
        assert dog.check([*fresh[:2], {**fresh[2], "started": 2.0, "seq": 1 + t}], 40.0 + t) is None


def test_replica_mode_names_a_stuck_replica_that_still_beats_after_its_timeout_not_before():
    from raygpt.train.watchdog import ReplicaWatchdog

    dog = ReplicaWatchdog("run", Path("/tmp/run"), 4.0, 600.0)
    hits = [t for t in range(0, 20) if dog.check(_replicas(t, stuck_from=3), float(t))]
    assert hits == [3 + 4], hits  # the hang timeout (4 s) after its last progress
    # every replica standing still (no one moves on): not one replica's fault, no verdict
    dog = ReplicaWatchdog("run", Path("/tmp/run"), 4.0, 600.0)
    still = [_rec(r, 1 + t, 10, gen=f"g{r}", world=1) for r in range(3) for t in [0]]
    assert all(dog.check([{**r, "seq": 1 + t} for r in still], float(t)) is None for t in range(20))
