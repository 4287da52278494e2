"""serve/vllm.yaml (Ray Serve LLM, vLLM engine) read the way Ray reads it: the Serve
deploy schema, then Serve LLM's own config models (LLMConfig imports without vLLM;
LLMServingArgs does not, so its field names are read from Ray's source)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
VLLM = ROOT / "serve" / "vllm.yaml"


def _serving_args_fields() -> set[str]:
    spec = importlib.util.find_spec("ray.llm._internal.serve.core.ingress.builder")
    tree = ast.parse(Path(spec.origin).read_text())
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LLMServingArgs"]
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_vllm_yaml_is_a_serve_llm_config():
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    raw = yaml.safe_load(VLLM.read_text())
    (app,) = ServeDeploySchema.model_validate(raw).applications
    assert app.import_path == "ray.serve.llm:build_openai_app" and app.route_prefix == "/"
    assert set(app.args) <= _serving_args_fields() and "llm_configs" in app.args
    (llm,) = [LLMConfig.model_validate(c) for c in app.args["llm_configs"]]
    assert llm.llm_engine == "vLLM"
    assert llm.model_loading_config.model_id == "raygpt"
    assert Path(llm.model_loading_config.model_source).is_absolute()
    assert llm.engine_kwargs["max_model_len"] <= 1024  # GPT-2's n_positions
    # LLMConfig passes deployment_config through to Serve, whose schemas ignore unknown
    # keys: so the names are checked against their fields, then the values validated.
    dc = llm.deployment_config
    assert set(dc) <= set(DeploymentSchema.model_fields), set(dc) - set(DeploymentSchema.model_fields)
    auto = dc["autoscaling_config"]
    assert set(auto) <= set(AutoscalingConfig.model_fields), set(auto) - set(AutoscalingConfig.model_fields)
    DeploymentSchema.model_validate({"name": "LLMServer", **dc})
    a = AutoscalingConfig(**auto)
    assert a.min_replicas <= a.initial_replicas <= a.max_replicas

