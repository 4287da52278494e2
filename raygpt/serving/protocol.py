"""The OpenAI-compatible wire format: request models, error shape, response helpers.

Every documented field of /v1/completions and /v1/chat/completions is accepted, and
`null` means "the default" wherever OpenAI allows it (SDKs and eval tools send
`max_tokens: null`, `best_of: 1`, `logprobs: null`, ...). A field we do not implement is
accepted at its default value and refused (400, `param` naming it) at any other value.
vLLM's extensions that clients written for it send are honoured (`min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `top_k: -1`,
`stream_options.continuous_usage_stats`). Any other field is ignored with a warning, as
vLLM does, nested ones included; `strict_requests` (a serve setting) refuses them (400).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raygpt.serving.constants import MAX_LOGPROBS, MAX_STOP_CHARS, SEED_MAX, SEED_MIN

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(errors: list[dict]) -> ApiError:
    """The first pydantic error as a 400 naming the field."""
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    param = loc[0] if loc else None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg', ''))}",
                        code=kind)
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}", param=param, code="unknown_field")
    if kind == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param, code=kind)
    msg = e.get("msg", "invalid value")
    where = ".".join(loc) if loc else None
    return ApiError(400, f"{where}: {msg}" if where else msg, param=param, code=kind or None)


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = False
    include_obfuscation: StrictBool | None = None  # accepted; we never add obfuscation
    continuous_usage_stats: StrictBool | None = False  # vLLM: usage in every chunk too


Seed = Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX)]
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]


class _Request(BaseModel):
    """Fields shared by completions and chat. `null` = the default (dropped before
    validation); `_UNSUPPORTED` maps a field to the values we accept for it."""

    model_config = ConfigDict(extra="forbid")
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    model: str | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(strict=True, ge=-100, le=100)]] | None = None
    n: StrictInt = Field(1, ge=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=-1)  # extension, as vLLM's: 0 and -1 = off
    user: str | None = None
    # vLLM's sampling extensions (clients written for vLLM send them)
    min_p: StrictFloat = Field(0.0, ge=0, le=1)
    repetition_penalty: StrictFloat = Field(1.0, gt=0, le=10)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None or k in cls.REQUIRED}
            for name, ok in cls.UNSUPPORTED.items():
                if name in data and data[name] not in ok:
                    raise ValueError(f"unsupported:{name}")
        return data

    def token_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            try:
                out[int(k)] = float(v)
            except ValueError:
                raise ApiError(400, f"logit_bias: key {k!r} is not a token id",
                               param="logit_bias") from None
        return out

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        if any(not s for s in stop):
            raise ApiError(400, "stop sequences must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise ApiError(400, f"stop sequences are limited to {MAX_STOP_CHARS} characters each",
                           param="stop", code="stop_too_long")
        return stop


class CompletionRequest(_Request):
    """OpenAI /v1/completions: every documented field. Not implemented (400 unless at the
    default): `best_of` > 1 and a non-empty `suffix`."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("prompt",)
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"best_of": (1,), "suffix": ("",)}

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=0)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # chat's name, sent here by some clients
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `refusal`, `annotations` of past turns
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    """OpenAI /v1/chat/completions: every documented field. Only text in and out: tools,
    audio, non-text response formats and predicted outputs are 400 unless at the default."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("messages",)
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
                    "function_call": ("none", "auto"), "audio": (),
                    "modalities": (["text"],), "prediction": (),
                    "response_format": ({"type": "text"},), "web_search_options": (),
                    "store": (False,)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: StrictBool | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    response_format: dict | None = None
    web_search_options: Any = None
    store: StrictBool | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]


def parse(model: type[BaseModel], body: bytes, strict: bool = False,
          ignored: list[str] | None = None) -> Any:
    """Validate a JSON body -> the model, or an ApiError(400) naming the field. Not
    strict: fields the model does not know (at any depth) are dropped and their dotted
    names appended to `ignored`."""
    from pydantic import ValidationError

    for _ in range(32):  # each pass drops the unknown fields pydantic reported
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            errs = e.errors()
            _refuse_unsupported(errs, body)
            extra = [err["loc"] for err in errs if err.get("type") == "extra_forbidden"]
            if strict or not extra:
                raise validation_error(errs) from None
            body = _drop(body, extra)
            if ignored is not None:
                ignored.extend(".".join(str(x) for x in loc) for loc in extra)
    raise ApiError(400, "too many unknown fields", code="unknown_field")


def _refuse_unsupported(errs: list[dict], body: bytes) -> None:
    for err in errs:
        msg = str(err.get("msg", ""))
        if "unsupported:" in msg:
            name = msg.split("unsupported:", 1)[1]
            raise ApiError(400, f"{name}={_raw(body, name)} is not supported by this server "
                           "(leave it unset or at its default)", param=name,
                           code="unsupported_parameter") from None


def _drop(body: bytes, locs: list[tuple]) -> bytes:
    data = json.loads(body)
    for loc in locs:
        node = data
        for key in loc[:-1]:
            if isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            elif isinstance(node, dict) and key in node:
                node = node[key]
            # else: a union member's tag in the error path (e.g. "list[TextPart]"): not in the data
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return json.dumps(data).encode()


def _raw(body: bytes, name: str) -> str:
    try:
        return json.dumps(json.loads(body).get(name))[:80]
    except Exception:
        return "?"
