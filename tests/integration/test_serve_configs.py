"""serve/*.yaml are valid Serve configs for this app (no Ray needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# vllm.yaml is Ray Serve LLM's app, not raygpt's (tests/unit/test_vllm_config.py).
CONFIGS = sorted(p for p in (ROOT / "serve").glob("*.yaml") if p.name != "vllm.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_config_valid(path):
    from ray.serve.schema import ServeDeploySchema

    from raygpt.serving.app import GPTServer, ServerSettings, build_app

    raw = yaml.safe_load(path.read_text())
    cfg = ServeDeploySchema.model_validate(raw)
    (app,) = cfg.applications
    assert app.import_path == "raygpt.serving.app:build_app"
    ServerSettings.from_args(app.args)  # every arg is known and well typed
    (dep,) = app.deployments
    assert dep.name == GPTServer.name
    assert dep.user_config["model_dir"] == app.args["model_dir"]
    assert dep.max_ongoing_requests >= app.args["max_slots"]
    assert dep.max_queued_requests > 0
    assert dep.backpressure_config.status_code == 503
    assert dep.backpressure_config.retry_after_s
    assert dep.health_check_period_s
    bound = build_app(app.args)
    assert bound is not None


def test_gpu_config_fractional_autoscaling():
    raw = yaml.safe_load((ROOT / "serve" / "gpu.yaml").read_text())
    dep = raw["applications"][0]["deployments"][0]
    assert 0 < dep["ray_actor_options"]["num_gpus"] < 1
    a = dep["autoscaling_config"]
    assert a["min_replicas"] <= a["max_replicas"] and a["target_ongoing_requests"] > 0


def test_unknown_arg_refused():
    from raygpt.errors import UserError
    from raygpt.serving.app import ServerSettings

    with pytest.raises(UserError, match="unknown serve args"):
        ServerSettings.from_args({"model_dir": "/x", "max_slot": 3})
