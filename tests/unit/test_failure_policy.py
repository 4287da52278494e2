"""raygpt's Train failure policy (it runs in the controller), called here as the controller
calls it, with Ray's own error type, against the shared test Ray's KV store."""
from __future__ import annotations

import json
import uuid

import pytest


def _beats(run_id: str) -> list[int]:
    from raygpt.train.heartbeat import read_beats

    return sorted(r["rank"] for r in read_beats(run_id))


@pytest.mark.parametrize("replica", [True, False])
def test_a_replica_ray_saw_die_leaves_no_heartbeat_for_the_hang_watchdog(ray_session, replica):
    """Replica mode: the killed rank's last beat goes with the decision to replace it, so
    the watchdog does not judge a dead process frozen while its replacement starts (the
    suite once saw that `hang` verdict when a replacement took over 5 s). Restart mode
    keeps every beat (its watchdog tells old groups from new by their gen)."""
    import ray.train

    from raygpt import raycompat
    from raygpt.train.heartbeat import NAMESPACE, beat_key, delete_keys
    from raygpt.train.rayhooks import RepeatAwareFailurePolicy

    run_id = uuid.uuid4().hex
    for r in range(3):
        raycompat.kv_put(beat_key(run_id, r), json.dumps({"rank": r, "gen": f"g{r}", "step": 5}), namespace=NAMESPACE)
    try:
        policy = RepeatAwareFailurePolicy(ray.train.FailureConfig(max_failures=3), run_id, None, replica=replica)
        err = ray.train.WorkerGroupError("rank 2 died", {2: RuntimeError("The actor died unexpectedly")})
        assert policy.make_decision(err) == raycompat.FailureDecision.RETRY
        assert _beats(run_id) == ([0, 1] if replica else [0, 1, 2])
    finally:
        delete_keys(f"hb:{run_id}:", prefix=True)
