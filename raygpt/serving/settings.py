"""`args` of build_app (and of `raygpt serve`): one validated model, unknown keys refused."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raygpt.errors import UserError
from raygpt.serving.constants import DEFAULT_KV_MEMORY_FRACTION


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model_dir: str | None = None
    model_name: str = "raygpt"            # the `model` clients name; stays across updates
    max_slots: int = Field(32, ge=1)      # KV-cache slots per replica = max batch (at most)
    # The KV budget (vLLM's gpu_memory_utilization, for the KV cache alone): slots =
    # min(max_slots, budget // one slot's KV bytes); a model swap must fit beside the cache
    # of the model still serving, or it is refused. The fraction is of GPU memory (on a
    # CPU: RAM, or the cgroup limit); kv_memory_bytes, when set, is the budget instead.
    kv_memory_fraction: float = Field(DEFAULT_KV_MEMORY_FRACTION, gt=0, le=1)
    kv_memory_bytes: int | None = Field(None, ge=1)
    max_waiting: int = Field(512, ge=1)   # engine queue beyond the slots (503 beyond it)
    max_fanout: int | None = Field(None, ge=1)  # prompts x n per request; default max_waiting // 4
    step_tokens: int = Field(256, ge=1)   # tokens per engine step (decode rows + prefill chunks)
    max_tokens_limit: int | None = Field(None, ge=1)  # default: the model's block_size
    max_n: int = Field(16, ge=1)          # max choices per prompt
    max_prompts: int = Field(32, ge=1)    # max prompts in one request (list prompt)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: bf16 on GPU
    num_threads: int | None = Field(None, ge=1)  # torch CPU threads (default: Ray's)
    # The engine loop in a process of its own (vLLM V1's EngineCore): it then holds a GIL
    # the replica's event loops do not share (see serving/core_process.py).
    engine_process: bool = False
    api_key_env: str | None = None        # env var holding API key(s), comma-separated; unset -> no auth
    max_body_bytes: int = Field(1 << 20, ge=1)  # request body limit (413 beyond)
    rate_limit_rps: float = Field(0.0, ge=0)  # requests/s per client (API key, else IP); 0 = off
    rate_limit_burst: float | None = Field(None, gt=0)
    rate_limit_tps: float = Field(0.0, ge=0)  # tokens/s per client (prompt + max_tokens); 0 = off
    rate_limit_token_burst: float | None = Field(None, gt=0)
    trusted_proxy_header: str | None = None  # e.g. X-Forwarded-For: client IP set by your proxy
    api_key_kv: str | None = None         # Ray KV entry holding API key(s) (raygpt serve --address)
    admin_key_env: str | None = None      # env var with admin key(s) for /admin/*; unset -> the API keys
    public_metrics: bool = False          # /metrics without the API key
    public_docs: bool = False             # /docs and /openapi.json without the API key
    max_concurrent_per_client: int | None = Field(None, ge=1)  # in-flight requests per client (429 beyond); None = off
    body_timeout_s: float = Field(30.0, gt=0)  # the whole request body within this (408 beyond)
    chat_template: str | None = None      # file with a chat template (default: model dir's, else built in)
    strict_requests: bool = False         # unknown request fields: 400 (default: ignored with a warning, as vLLM)
    max_failed_steps: int = Field(5, ge=1)  # consecutive failed engine steps -> unhealthy
    step_delay_s: float = Field(0.0, ge=0)  # testing aid: slows each engine step down
    fault_file: str | None = None         # testing aid: steps fail while this file names the replica

    @model_validator(mode="after")
    def _fanout(self):
        if self.max_fanout is None:
            object.__setattr__(self, "max_fanout", max(1, self.max_waiting // 4))
        return self

    @classmethod
    def from_args(cls, args: dict | None) -> "ServerSettings":
        args = dict(args or {})
        unknown = sorted(set(args) - set(cls.model_fields))
        if unknown:
            raise UserError(f"unknown serve args {unknown}; known: {sorted(cls.model_fields)}")
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(x) for x in err["loc"]) or "args"
            raise UserError(f"serve arg {name}={err.get('input')!r}: {err['msg']}") from None
