"""A node that joins is counted at the elastic policy's next look, not at Ray's next
coordinator tick. Ray Train's AutoscalingCoordinator re-read the cluster only every 20 s,
so a grow-back came 21-44 s after the node had rejoined (test_partition's timeline); the
policy now asks it to recompute. Real parts: a local multi-node Ray (ray.cluster_utils)
in a child process (this process may hold the shared test Ray), Ray's own coordinator
actor, raygpt's policy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, time
from types import SimpleNamespace
import ray, ray.train
from ray.cluster_utils import Cluster
from raygpt.train.elastic import LiveElasticScalingPolicy

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
try:
    cluster.add_node(num_cpus=1, resources={"w": 1})
    ray.init(address=cluster.address)
    pol = LiveElasticScalingPolicy(ray.train.ScalingConfig(num_workers=(1, 3), resources_per_worker={"w": 1}))
    pol.after_controller_start(SimpleNamespace(run_id="t"))  # registers with the coordinator, as Ray's controller
    before = pol._count_possible_workers(pol._get_reserved_resources())
    t_join = time.monotonic()
    cluster.add_node(num_cpus=1, resources={"w": 1})  # returns once the raylet is up
    # the policy's next look: the first answer it asked for after the join (until then it
    # answers from its cache, throttled to one look a GET_RESERVED_RESOURCES_INTERVAL_S)
    deadline = t_join + 10 * pol.GET_RESERVED_RESOURCES_INTERVAL_S
    while True:
        reserved = pol._get_reserved_resources()
        if pol._fresh_t > t_join or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert pol._fresh_t > t_join, "the policy asked for no fresh reservation"
    after = pol._count_possible_workers(reserved)
    print("RESULT", json.dumps({"before": before, "after": after, "seen_s": round(time.monotonic() - t_join, 2)}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_a_node_that_joined_is_counted_at_the_next_look():
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line.removeprefix("RESULT "))
    print(f"\n2nd node counted {res['seen_s']} s after it joined (Ray's own refresh: every 20 s)")
    assert res["before"] == 1 and res["after"] == 2, res
