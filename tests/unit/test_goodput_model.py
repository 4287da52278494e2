"""The scale model (raygpt.train.goodput_model)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raygpt.train.goodput_model import LLAMA3_NODE_MTBF_S, predict, predict_replica, young_interval


def test_youngs_interval_is_the_best_one_and_matches_the_published_anchor():
    best = predict(16384, LLAMA3_NODE_MTBF_S, save_s=10, restart_s=120)
    assert 2.9 < best.cluster_mtbf_s / 3600 < 3.3  # Llama 3: an interruption every ~3 hours
    assert 7 < best.interval_s / 60 < 9  # the sqrt(2 x 10 s x 3 h) ~ 8 minutes
    for k in (0.25, 0.5, 2, 4):
        assert predict(16384, LLAMA3_NODE_MTBF_S, 10, 120, interval_s=k * best.interval_s).goodput < best.goodput
    assert best.goodput == pytest.approx(1 - best.save_overhead - best.failure_overhead)


def test_goodput_falls_with_scale_and_with_restart_cost():
    g = [predict(n, LLAMA3_NODE_MTBF_S, 10, 120).goodput for n in (8, 64, 1024, 16384)]
    assert g == sorted(g, reverse=True) and g[0] > 0.99
    assert predict(1024, LLAMA3_NODE_MTBF_S, 10, 600).goodput < predict(1024, LLAMA3_NODE_MTBF_S, 10, 60).goodput
    assert young_interval(0, 3600) == 0
    with pytest.raises(ValueError):
        predict(0, LLAMA3_NODE_MTBF_S, 10, 120)


def test_replica_mode_loses_the_stall_and_the_missing_replicas_share_only():
    """A failure in replica mode re-runs nothing: with the stall and the time out equal to
    restart mode's R, it keeps more; more replicas make a lost one cheaper; one replica
    has no peer to heal from and is restart mode."""
    rep = predict_replica(16384, LLAMA3_NODE_MTBF_S, 10, stall_s=10, rejoin_s=120, gpus_per_replica=8)
    m = rep.cluster_mtbf_s
    assert rep.goodput == pytest.approx(1 - 10 / rep.interval_s - (10 + 120 / 2048) / m)
    assert rep.goodput > predict(16384, LLAMA3_NODE_MTBF_S, 10, 120).goodput
    few = predict_replica(16, LLAMA3_NODE_MTBF_S, 10, 10, 120, gpus_per_replica=8, interval_s=600)
    many = predict_replica(16, LLAMA3_NODE_MTBF_S, 10, 10, 120, gpus_per_replica=1, interval_s=600)
    assert many.goodput > few.goodput
    assert predict_replica(8, LLAMA3_NODE_MTBF_S, 10, 10, 120, gpus_per_replica=8) == \
        predict(8, LLAMA3_NODE_MTBF_S, 10, 130)
    with pytest.raises(ValueError):
        predict_replica(8, LLAMA3_NODE_MTBF_S, 10, -1, 120, gpus_per_replica=8)


def test_the_bench_script_prints_a_row_per_size():
    bench = Path(__file__).resolve().parents[2] / "bench" / "goodput_plan.py"
    out = subprocess.run([sys.executable, str(bench), "--gpus", "8", "16384"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert out[0].startswith("inputs:") and len(out) == 4
    assert out[2].split()[0] == "8" and out[3].split()[0] == "16384"
