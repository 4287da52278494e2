"""Search-space parsing, feasibility and concurrency (no Ray)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from raygpt.config import load_config
from raygpt.tune.planner import Cluster, candidate_configs, infeasible_reason, max_concurrent, plan_key
from raygpt.tune.space import SpaceError, apply_params, default_space, load_space, parse_space, trial_config


def _base():
    return load_config("debug").to_dict()


def test_parses_all_distributions_and_nested_sections():
    s = parse_space({
        "optim.lr": {"loguniform": [1e-4, 3e-3]},
        "optim": {"weight_decay": {"uniform": [0.0, 0.2]}},
        "train.micro_batch": {"choice": [2, 4]},
        "parallel.strategy": {"grid": ["ddp", "fsdp"]},
        "run.num_workers": {"randint": [1, 2]},
        "parallel.activation_checkpointing": {"choice": [False, True]},
        "optim.warmup_steps": 5,
    })
    assert s.keys == ["optim.lr", "optim.weight_decay", "train.micro_batch", "parallel.strategy",
                      "run.num_workers", "parallel.activation_checkpointing", "optim.warmup_steps"]
    assert s.constants == {"optim.warmup_steps": 5}
    assert s.get("run.num_workers").values() == [1, 2]  # randint bounds are inclusive
    assert s.grid_size() == 2
    assert not s.is_discrete
    # round trip through the saved form
    assert parse_space(s.to_dict()).to_dict() == s.to_dict()


def test_to_tune_domains():
    pytest.importorskip("ray.tune")
    from ray.tune.search.sample import Categorical, Float, Integer

    t = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-3]}, "run.num_workers": {"randint": [1, 3]},
                     "parallel.strategy": {"grid": ["ddp", "fsdp"]}, "train.micro_batch": {"choice": [2, 4]}}).to_tune()
    assert isinstance(t["optim.lr"], Float)
    assert isinstance(t["run.num_workers"], Integer) and t["run.num_workers"].upper == 4  # exclusive
    assert t["parallel.strategy"] == {"grid_search": ["ddp", "fsdp"]}
    assert isinstance(t["train.micro_batch"], Categorical)


@pytest.mark.parametrize("data, msg", [
    ({"optim.lrr": {"loguniform": [1e-4, 1e-3]}}, "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ({"optm.lr": {"loguniform": [1e-4, 1e-3]}}, "unknown config section 'optm' (did you mean 'optim'?)"),
    ({"lr": {"loguniform": [1e-4, 1e-3]}}, "expected section.field"),
    ({"optim": {"loguniform": [1e-4, 1e-3]}}, "'optim' is a section"),
    ({"train.micro_batch": {"choice": []}}, "train.micro_batch: choice list is empty"),
    ({"parallel.strategy": {"grid": []}}, "parallel.strategy: grid list is empty"),
    ({"optim.lr": {"loguniform": [0, 1e-3]}}, "loguniform bounds must be > 0"),
    ({"optim.lr": {"loguniform": [-1e-3, 1e-3]}}, "loguniform bounds must be > 0"),
    ({"optim.lr": {"uniform": [0.0, 1e-3]}}, "optim.lr (low bound)=0.0: Input should be greater than 0"),
    ({"optim.lr": {"choice": [1e-3, -1e-4]}}, "optim.lr=-0.0001: Input should be greater than 0"),
    ({"optim.lr": 0}, "optim.lr=0: Input should be greater than 0"),
    ({"optim.lr": {"loguniform": [1e-3, 1e-4]}}, "low 0.001 must be smaller than high 0.0001"),
    ({"optim.lr": {"logunifrom": [1e-4, 1e-3]}}, "unknown distribution 'logunifrom' (did you mean 'loguniform'?)"),
    ({"optim.lr": {"normal": [1e-4, 1e-3]}}, "unknown distribution 'normal'"),
    ({"optim.lr": {"loguniform": [1e-4]}}, "loguniform takes [low, high]"),
    ({"optim.lr": {"loguniform": ["a", 1e-3]}}, "bounds must be numbers"),
    ({"optim.lr": [1e-4, 1e-3]}, "a list needs a distribution"),
    ({"optim.lr": {"loguniform": [1e-4, 1e-3], "choice": [1]}}, "expected one distribution"),
    ({"parallel.strategy": {"choice": ["ddp", "zero3"]}}, "parallel.strategy='zero3'"),
    ({"run.num_workers": {"randint": [0, 2]}}, "run.num_workers (low bound)=0"),
    ({"run.num_workers": {"randint": [1.5, 2]}}, "randint bounds must be integers"),
    ({"run.num_workers": {"uniform": [1, 4]}}, "use choice, grid or randint"),
    ({"train.micro_batch": {"grid": [2, 2]}}, "duplicates"),
    ({"run.storage": {"choice": ["/a", "/b"]}}, "set by the sweep itself"),
    ({"optim.warmup_steps": 5}, "has no distribution"),
    ({}, "is empty"),
    ([1, 2], "expected a mapping"),
])
def test_bad_spaces_are_one_line_errors(data, msg):
    with pytest.raises(SpaceError) as e:
        parse_space(data, "'s.yaml'")
    text = str(e.value)
    assert msg in text, text
    assert "\n" not in text and text.startswith("search space 's.yaml'")


def test_load_space_file_errors(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {loguniform: [1, 2]\n")
    with pytest.raises(SpaceError, match="invalid YAML"):
        load_space(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"optim.lr": {"loguniform": [1e-4, 1e-3]}}))
    assert load_space(ok).keys == ["optim.lr"]


def test_example_spaces_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "jobs" / "spaces").glob("*.yaml"))
    assert files
    for f in files:
        load_space(f)


def test_lr_keeps_min_lr_ratio():
    base = _base()  # debug: lr 1e-3, min_lr 1e-4
    d = apply_params(base, {"optim.lr": 2e-5})
    assert math.isclose(d["optim"]["min_lr"], 2e-6)
    cfg = trial_config(base, {"optim.lr": 2e-5})
    assert cfg.optim.min_lr <= cfg.optim.lr
    assert trial_config(base, {"optim.lr": 1e-3, "optim.min_lr": 0.0}).optim.min_lr == 0.0


def test_infeasible_reasons():
    base = _base()
    cl = Cluster({"CPU": 4.0})
    ok = trial_config(base, {"run.num_workers": 2, "parallel.strategy": "ddp"})
    assert infeasible_reason(ok, cl) is None
    many = trial_config(base, {"run.num_workers": 8})
    assert "needs 8 CPU" in infeasible_reason(many, cl) and "cluster has 4" in infeasible_reason(many, cl)
    odd = trial_config(base, {"run.num_workers": 3, "parallel.strategy": "ddp"})
    assert "global_batch=8 is not divisible by the data-parallel size 3" in infeasible_reason(odd, cl)
    tp = trial_config(base, {"run.num_workers": 3, "parallel.strategy": "tp", "parallel.tp_degree": 1})
    assert "n_head" in infeasible_reason(tp, cl)
    none2 = trial_config(base, {"run.num_workers": 2, "parallel.strategy": "none"})
    assert "exactly 1 worker" in infeasible_reason(none2, cl)
    micro = trial_config(base, {"run.num_workers": 2, "train.micro_batch": 3})
    assert infeasible_reason(micro, cl, "quality") is None  # same math, just another micro batch
    r = infeasible_reason(micro, cl, "throughput")
    assert "train.micro_batch=3 does not divide the per-rank batch 4" in r and "micro batch 2" in r
    gpu = Cluster({"CPU": 8.0, "GPU": 1.0}, use_gpu=True)
    assert "needs 2 GPU" in infeasible_reason(ok, gpu)


def test_candidates_and_duplicates():
    base = _base()
    space = parse_space({"run.num_workers": {"grid": [1, 2]}, "parallel.strategy": {"grid": ["ddp", "fsdp"]},
                         "train.micro_batch": {"grid": [4, 16]}})
    cands = candidate_configs(base, space)
    assert len(cands) == 8
    errors = [e for _, c, e in cands if e]
    assert len(errors) == 4 and all("micro_batch=16 is larger than train.global_batch=8" in e for e in errors)
    cl = Cluster({"CPU": 4.0})
    keys = [plan_key(c, cl) for _, c, _ in cands if c is not None]
    # on one worker ddp and fsdp both run the plain model
    assert len(set(keys)) == 3


def test_max_concurrent():
    cl = Cluster({"CPU": 6.0})
    assert max_concurrent([{"CPU": 1.0}, {"CPU": 2.0}], cl) == 3
    assert max_concurrent([{"CPU": 2.0}, {"CPU": 8.0}], cl) == 3  # infeasible sizes ignored
    assert max_concurrent([{"CPU": 4.0}], cl) == 1
    assert max_concurrent([{"CPU": 1.0}], cl, user_limit=2) == 2
    assert max_concurrent([{"CPU": 9.0}], cl) == 1
    gpu = Cluster({"CPU": 64.0, "GPU": 8.0}, use_gpu=True)
    assert max_concurrent([{"CPU": 4.0, "GPU": 4.0}], gpu) == 2


def test_default_spaces():
    cfg = load_config("debug")
    q = default_space("quality", cfg, max_workers=4)
    assert q.get("optim.lr").kind == "loguniform" and q.get("run.num_workers").values() == [1, 2]
    t = default_space("throughput", cfg, max_workers=4)
    assert t.is_discrete and t.get("run.num_workers").values() == [1, 2, 4]
    assert default_space("throughput", cfg, max_workers=1).get("run.num_workers") is None
    with pytest.raises(SpaceError, match="--mode"):
        default_space("speed", cfg)


def test_cli_rejects_bad_space_before_ray(tmp_path):
    """The CLI prints one line and exits 2, without starting Ray."""
    bad = tmp_path / "space.yaml"
    bad.write_text("optim.lr: {loguniform: [0, 1.0e-3]}\n")
    p = subprocess.run([sys.executable, "-m", "raygpt.cli", "tune", "--preset", "debug", "--space", str(bad),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: search space '{bad}': optim.lr: loguniform bounds must be > 0, got [0, 0.001]"]
    assert not (tmp_path / "out").exists()
    p = subprocess.run([sys.executable, "-m", "raygpt.cli", "tune", "--preset", "debug", "--mode", "speed"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--mode 'speed'" in p.stderr
