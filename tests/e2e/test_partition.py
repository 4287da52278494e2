"""Partitions and slow links, through `raygpt chaos` on a local cluster whose two worker
nodes live in their own network namespaces (raygpt.train.netns: real veths on a bridge,
real `ray start` inside each namespace, links cut with `ip link` and slowed with tc).

One run serves both cases (a cluster start and the heal wait cost minutes on this 2-core
machine): rank 1's link is slowed to 5mbit at step 3 (flagged as a slow link, nothing
restarts); at step 27 the same link is cut (the run goes on on the other node from the
step-25 checkpoint); 30 s later (and not before the run went on without it) the link
returns, Ray having declared the node dead (its health check tightened to ~10 s with
--node-dead-after: Ray's own ~60 s only made the test slower), a fresh `ray start` joins
and the run grows back to 2 workers at step 37.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raygpt.train.metrics import read_metrics
from raygpt.train.netns import unusable_reason

STEPS, SLOW_AT, CUT_AT, GROW_AT, CKPT_EVERY = 45, 3, 27, 37, 5

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(unusable_reason() is not None, reason=str(unusable_reason()))]


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("partition")
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raygpt.cli", "chaos", "--preset", "debug", "--num-workers", "1:2",
           "--nodes", "2", "--steps", str(STEPS), "--out", str(out),
           "--slow-link-at", str(SLOW_AT), "--link-rate", "5mbit",
           "--partition-node-at", str(CUT_AT), "--partition-for", "30", "--node-dead-after", "10",
           "--await-grow-at", str(GROW_AT), "--resize-interval", "3", "--await-timeout", "300",
           "--set", "model.n_embd=64", "--set", f"checkpoint.every={CKPT_EVERY}", "--set", "train.eval_every=1000"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("chaos-")]
    timeline = json.loads((run_dir / "timeline.json").read_text())["events"]
    return run_dir, timeline, read_metrics(run_dir)


def _one(timeline: list[dict], name: str) -> dict:
    (e,) = [e for e in timeline if e["event"] == name]
    return e


def test_a_partitioned_node_is_left_behind_within_60s_and_rejoins_when_the_link_returns(chaos_run):
    run_dir, timeline, recs = chaos_run
    cut = _one(timeline, "failure injected: link cut")
    assert cut["rank"] == 1 and cut["step"] >= CUT_AT, cut
    # The first step on the remaining node, timed from the cut: measured 25-30 s here
    # (the resize check's liveness probe, a 5 s group teardown, a 1-worker start).
    first = [e for e in timeline if e["event"] == "first step after restore"][0]
    assert first["world_size"] == 1 and first["recovery_s"] < 60, timeline
    starts = [r for r in recs if r.get("event") == "start"]
    assert [s["world_size"] for s in starts] == [2, 1, 2], starts
    # restored from the latest checkpoint before the cut; the steps since then re-run
    saved = [r["step"] for r in recs if r.get("event") == "checkpoint" and r["time"] < starts[1]["time"]]
    assert starts[1]["step"] == max(saved) == CUT_AT // CKPT_EVERY * CKPT_EVERY, (saved, starts)
    assert first["steps_lost"] == cut["step"] - starts[1]["step"] < CKPT_EVERY + 2, first
    # the link returns: a fresh raylet joins and the run grows back at the held step
    names = [e["event"] for e in timeline]
    assert names.index("link healed") < names.index("node rejoined"), names
    assert "grow-back did not come" not in names
    assert starts[2]["step"] == GROW_AT and _one(timeline, "node rejoined")["node"] != cut["node"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2


def test_a_slowed_link_is_a_straggler_not_a_failure(chaos_run):
    run_dir, timeline, recs = chaos_run
    cut_t = next(r["time"] for r in recs if "loss" in r and r["step"] == _one(timeline, "failure injected: link cut")["step"])
    # one event for the slowed link (CI once saw two: the flag flapped at the bar)
    (ev,) = [r for r in recs if r.get("event") == "straggler" and r.get("kind") == "link" and r["time"] < cut_t]
    assert ev["rank"] == 1 and ev["ratio"] >= 1.5 and ev["rtt_ms"] >= 50, ev  # measured 83-143 ms, 67-107x
    assert SLOW_AT <= ev["step"] < CUT_AT, ev
    slowed = _one(timeline, "link slowed")
    assert ev["node"].startswith(slowed["node"])
    # no hang declared and no restart while the link was only slow
    assert not [r for r in recs if r.get("event") == "hang" and r["time"] < cut_t], recs
    starts = [r for r in recs if r.get("event") == "start"]
    assert starts[1]["time"] > cut_t
    steps = [r["step"] for r in recs if "loss" in r and r["time"] < cut_t]
    assert steps == list(range(1, max(steps) + 1))  # every step once up to the cut
