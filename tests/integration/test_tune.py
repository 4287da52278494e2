"""Real Ray Tune sweeps of Ray Train runs (Train V2, CPU, gloo) on the debug preset.

Each trial is a TorchTrainer fit (~30 s on a 2-core machine, Ray Train startup
dominates), so the sweeps are small: 20 steps, evaluation every 5 (ASHA rungs at 5 and
10), a handful of trials.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import wait_for

from raygpt.config import load_config
from raygpt.tune.commands import build_spec
from raygpt.tune.runner import SweepSpec, run_sweep

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "jobs" / "configs" / "tune-debug.yaml")


def _space(tmp_path, data: dict) -> str:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _sets(char_data, *more):
    return [f"data.path={char_data}", "train.log_every=5", *more]


def _placement_groups() -> dict[str, dict]:
    from ray.util.placement_group import placement_group_table

    return placement_group_table()


def _assert_released(before: dict, timeout=30.0) -> None:
    """Every placement group created since `before` releases its resources within
    `timeout` s (Tune's own trial groups go away as the trial actors exit, a moment after
    the sweep returns)."""
    def live():
        return [pg for pid, pg in _placement_groups().items() if pid not in before and pg.get("state") == "CREATED"]

    wait_for(lambda: not live(), timeout, lambda: f"placement groups still holding resources: {live()}",
             interval=0.5)


@pytest.mark.timeout(900)
def test_quality_sweep_asha_best_yaml_trains(char_data, tmp_path):
    """3 two-worker trials over lr x strategy: all end, ASHA stops some early, the
    stopped trials' Train workers are released, best.yaml is valid and trains. (Sweeps
    mixing worker counts: the throughput planner test below.)

    Also ray-project/ray#54305: trials run one at a time in grid order (3e-3, 1e-5,
    3e-5), each holding 4 of the 6 CPUs. The 1e-5 trial is stopped at step 5 (worse
    than 3e-3's rung); the trial after it must still get its workers: without raygpt's
    release it waits for the stopped trial's CPUs until the worker group start times out."""
    space = _space(tmp_path, {
        "optim.lr": {"grid": [3.0e-3, 1.0e-5, 3.0e-5]},
        "run.num_workers": 2,
        "parallel.strategy": {"choice": ["ddp", "fsdp"]},
    })
    out = tmp_path / "quality"
    before = _placement_groups()
    t0 = time.monotonic()
    spec = build_spec(config=BASE, sets=_sets(char_data, "run.cpus_per_worker=2"), space=space,
                      mode="quality", num_samples=1, out=str(out), seed=0, max_concurrent=1)
    outcome = run_sweep(spec)
    took = time.monotonic() - t0
    rows = outcome.rows
    assert len(rows) == 3
    statuses = [r["status"] for r in rows]
    assert set(statuses) <= {"completed", "stopped early"}, rows
    assert statuses.count("stopped early") >= 1, rows
    assert statuses.count("completed") >= 1, rows
    assert {r["run.num_workers"] for r in rows} == {2}
    assert {r["optim.lr"] for r in rows} == {3.0e-3, 1.0e-5, 3.0e-5}
    stopped_2w = [r for r in rows if r["run.num_workers"] == 2 and r["optim.lr"] == 1.0e-5]
    assert stopped_2w[0]["status"] == "stopped early", rows
    after = [r for r in rows if r["run.num_workers"] == 2 and r["optim.lr"] == 3.0e-5]
    assert after[0]["world_size"] == 2 and after[0]["step"] >= 5, rows  # it got its workers
    for r in rows:
        if r["status"] == "stopped early":
            assert r["step"] < 20
        else:
            assert r["step"] == 20
    # sorted by val loss: completed trials first, the winner has the large learning rate
    done = [r for r in rows if r["status"] == "completed"]
    assert [r["val_loss"] for r in done] == sorted(r["val_loss"] for r in done)
    assert rows[0]["rank"] == 1 and rows[0]["optim.lr"] == 3.0e-3

    # every stopped trial's worker group was released (ray-project/ray#54305)
    _assert_released(before)

    # outputs
    for name in ("results.csv", "results.parquet", "sweep.png", "best.yaml", "sweep.json"):
        assert (out / name).is_file(), name
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 3 and list(csv["rank"])[0] == 1
    assert len(pd.read_parquet(out / "results.parquet")) == 3

    # best.yaml is a full config that trains as is (shortened here)
    best = load_config(path=out / "best.yaml")
    assert best.optim.lr == pytest.approx(3.0e-3)
    assert best.train.max_steps == 20 and best.run.storage is None and best.run.name is None
    assert best.run.num_workers == rows[0]["run.num_workers"]
    from raygpt.train.launch import run_training

    short = load_config(path=out / "best.yaml", overrides=[
        "train.max_steps=2", f"run.storage={tmp_path / 'runs'}", "run.name=best", "run.num_workers=1"])
    summary = run_training(short, progress=False)
    assert summary["steps"] == 2 and summary["final_val_loss"] is not None
    print(f"quality sweep: {took:.0f} s for 3 trials")


@pytest.mark.timeout(600)
def test_throughput_planner_ranks_and_marks_infeasible(char_data, tmp_path):
    space = _space(tmp_path, {
        "run.num_workers": {"grid": [1, 2, 8]},
        "train.micro_batch": {"grid": [4, 3]},
        "parallel.strategy": "ddp",
    })
    out = tmp_path / "plan"
    from raygpt.cli import main

    before = _placement_groups()
    rc = main(["tune", "--mode", "throughput", "--config", BASE, "--space", space, "--out", str(out),
               "--steps", "6", *sum((["--set", s] for s in _sets(char_data)), [])])
    assert rc == 0
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6
    ok = df[df["status"] == "completed"]
    assert sorted(zip(ok["run.num_workers"], ok["train.micro_batch"])) == [(1, 4), (2, 4)]
    assert list(ok["rank"]) == [1, 2]
    assert (ok["tokens_per_s"] > 0).all() and (ok["peak_mem_mb"] > 0).all()
    per_dev = list(ok["tokens_per_s_per_device"])
    assert per_dev == sorted(per_dev, reverse=True)
    bad = df[df["status"] == "infeasible"].set_index(["run.num_workers", "train.micro_batch"])
    assert len(bad) == 4
    assert "needs 8 CPU" in bad.loc[(8, 4), "reason"] and "cluster has 6" in bad.loc[(8, 4), "reason"]
    assert "train.micro_batch=3 does not divide the per-rank batch 8" in bad.loc[(1, 3), "reason"]
    assert "per-rank batch 4" in bad.loc[(2, 3), "reason"]
    fastest = load_config(path=out / "fastest.yaml")
    winner = ok.iloc[0]
    assert fastest.run.num_workers == winner["run.num_workers"]
    assert fastest.train.max_steps == 20  # the user's run length, not the measurement's
    assert (out / "sweep.png").stat().st_size > 1000
    _assert_released(before)


DRIVER = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    from raygpt.tune.runner import SweepSpec, run_sweep
    out = sys.argv[1]
    if sys.argv[2] == "resume":
        o = run_sweep(SweepSpec.load(out), resume=True)
    else:
        from raygpt.tune.commands import build_spec
        o = run_sweep(build_spec(**json.loads(sys.argv[3])))
    print("STATUSES", json.dumps([r["status"] for r in o.rows]), flush=True)
    ray.shutdown()
""")


def _driver(tmp_path, *args, log):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAYGPT_TUNE_VERBOSE": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True, cwd=str(tmp_path))


@pytest.mark.timeout(900)
def test_restore_after_killed_driver(char_data, tmp_path):
    """Kill the sweep's driver (and its Ray) mid-trial; `Tuner.restore` in a new driver
    continues the unfinished trial from its Train checkpoint and runs the pending one."""
    out = tmp_path / "sweep"
    space = _space(tmp_path, {"optim.lr": {"grid": [3.0e-3, 2.0e-3]}})
    # 200 steps (a checkpoint every 20) so that the driver dies mid-trial; eval only at
    # the end: no ASHA here, restore is the point
    args = dict(config=BASE, space=space, mode="quality", num_samples=1, out=str(out), max_concurrent=1,
                sets=_sets(char_data, "run.num_workers=1", "parallel.strategy=none", "train.max_steps=200",
                           "checkpoint.every=20", "train.eval_every=200", "train.log_every=20"))
    with open(tmp_path / "first.log", "w") as log:
        p = _driver(tmp_path, str(out), "new", json.dumps(args), log=log)
        # kill as soon as Train has registered the first trial's first checkpoint
        def first_checkpoint():
            for f in (out / "trials").glob("*/checkpoint_manager_snapshot.json"):
                if "checkpoint_00000" in f.read_text():
                    return f.parent.name
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]  # the driver died first
            return None

        killed_trial = wait_for(first_checkpoint, 480,
                                lambda: (tmp_path / "first.log").read_text()[-3000:], interval=0.1)
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    summary = out / "trials" / killed_trial / "summary.json"
    assert not summary.exists(), "the trial finished before the driver was killed"
    assert not (out / "results.csv").exists()

    with open(tmp_path / "second.log", "w") as log:
        p = _driver(tmp_path, str(out), "resume", log=log)
        rc = p.wait(timeout=600)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-4000:]
    assert 'STATUSES ["completed", "completed"]' in text, text[-4000:]
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 2 and set(df["status"]) == {"completed"} and set(df["step"]) == {200}
    # the killed trial continued from its checkpoint instead of starting over
    events = [json.loads(line) for line in (out / "trials" / killed_trial / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["step"] == 0, starts
    assert starts[1]["restored"] is True and starts[1]["step"] >= 20, starts


@pytest.mark.timeout(600)
def test_optuna_search_samples_and_writes_best(char_data, tmp_path):
    """`--search optuna`: Tune's OptunaSearch (TPE, offline) proposes the learning rates
    from a log-uniform range; every trial ends and best.yaml holds the winner's."""
    space = _space(tmp_path, {"optim.lr": {"loguniform": [1.0e-4, 3.0e-3]}})
    out = tmp_path / "optuna"
    spec = build_spec(config=BASE, space=space, mode="quality", num_samples=2, out=str(out),
                      search="optuna", seed=0, max_concurrent=2,
                      sets=_sets(char_data, "run.num_workers=1", "parallel.strategy=none",
                                 "train.max_steps=10"))
    outcome = run_sweep(spec)
    rows = outcome.rows
    assert len(rows) == 2
    assert {r["status"] for r in rows} <= {"completed", "stopped early"}, rows
    lrs = [r["optim.lr"] for r in rows]
    assert all(1.0e-4 <= lr <= 3.0e-3 for lr in lrs) and len(set(lrs)) == 2, lrs
    assert json.loads((out / "sweep.json").read_text())["search"] == "optuna"
    best = load_config(path=out / "best.yaml")
    assert best.optim.lr == pytest.approx(rows[0]["optim.lr"])


def test_optuna_search_refuses_grid(char_data, tmp_path):
    space = _space(tmp_path, {"optim.lr": {"grid": [1.0e-3, 2.0e-3]}})
    spec = build_spec(config=BASE, space=space, mode="quality", num_samples=1, out=str(tmp_path / "o"),
                      search="optuna", sets=_sets(char_data))
    from raygpt.config import ConfigError

    with pytest.raises(ConfigError, match="use choice instead of grid"):
        run_sweep(spec)
    assert not (tmp_path / "o" / "trials").exists()
