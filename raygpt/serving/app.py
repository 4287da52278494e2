"""Ray Serve deployment: an OpenAI-style completions API over the continuous-batching engine.

    serve run serve/debug.yaml                      # config file (import_path: build_app)
    serve run raygpt.serving.app:build_app model_dir=/abs/path/to/model
    raygpt serve /abs/path/to/model --port 8000     # the same, one command

Endpoints: POST /v1/completions (stream or not), GET /v1/models, GET /healthz,
GET /v1/stats (engine counters), GET / (playground page).

Model updates: `user_config: {model_dir: ...}`. `reconfigure` loads the new directory in a
thread while the old engine keeps serving, warms it up, then swaps it in; requests hold
the engine they started on, so in-flight requests finish on the old model, which is then
drained and dropped. A directory that fails to load is refused: the old model keeps
serving and the error shows in GET /v1/models (`last_update_error`) and in the logs.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx
status for every bad input (400 invalid, 401 key, 404 model/route, 413 body, 429 rate).
"""
# No `from __future__ import annotations` here: FastAPI must resolve the endpoint
# annotations (`request: Request`) of the class Serve wraps; as strings they turn into
# query parameters.
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygpt.errors import UserError

log = logging.getLogger("ray.serve")

STATIC = Path(__file__).parent / "static"

# --------------------------------------------------------------------------- settings


@dataclass
class ServerSettings:
    """`args` of build_app (and of `raygpt serve`)."""

    model_dir: str | None = None
    model_name: str = "raygpt"          # the `model` clients name; stays across updates
    max_slots: int = 32                 # KV-cache slots per replica = max batch
    max_waiting: int = 512              # engine queue beyond the slots (503 beyond it)
    max_tokens_limit: int | None = None  # default: the model's block_size
    max_n: int = 16                     # max choices per prompt
    max_prompts: int = 32               # max prompts in one request (list prompt)
    device: str = "auto"                # auto | cpu | cuda
    dtype: str | None = None            # float32 | bfloat16 | float16 (default: bf16 on GPU)
    num_threads: int | None = None      # torch CPU threads (default: Ray's OMP_NUM_THREADS)
    api_key_env: str | None = None      # env var holding the API key; unset -> no auth
    max_body_bytes: int = 1 << 20       # request body limit (413 beyond)
    rate_limit_rps: float = 0.0         # per client (API key or IP), 0 = off; per replica
    rate_limit_burst: float | None = None
    step_delay_s: float = 0.0           # testing aid: slows each engine step down

    @classmethod
    def from_args(cls, args: dict | None) -> "ServerSettings":
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UserError(f"unknown serve args {unknown}; known: {sorted(known)}")
        s = cls(**args)
        for name in ("max_slots", "max_waiting", "max_n", "max_prompts", "max_body_bytes"):
            v = getattr(s, name)
            try:
                setattr(s, name, int(v))
            except (TypeError, ValueError):
                raise UserError(f"serve arg {name}={v!r} is not an integer") from None
            if getattr(s, name) < 1:
                raise UserError(f"serve arg {name} must be >= 1")
        for name in ("rate_limit_rps", "step_delay_s"):
            setattr(s, name, float(getattr(s, name)))
        if s.rate_limit_burst is not None:
            s.rate_limit_burst = float(s.rate_limit_burst)
        if s.max_tokens_limit is not None:
            s.max_tokens_limit = int(s.max_tokens_limit)
        if s.num_threads is not None:
            s.num_threads = int(s.num_threads)
        return s


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


def _validation_error(errors: list[dict]) -> ApiError:
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
        loc = loc[1:]
    param = loc[0] if loc else None
    kind = e.get("type", "")
    if kind == "json_invalid":
        msg = f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg', ''))}"
        param = None
    elif kind == "extra_forbidden":
        msg = f"unknown field {param!r}"
        code = "unknown_field"
        return ApiError(400, msg, param=param, code=code)
    elif kind == "missing":
        msg = f"missing required field {param!r}"
    else:
        msg = f"{param}: {e.get('msg', 'invalid value')}" if param else e.get("msg", "invalid request")
    return ApiError(400, msg, param=param, code=kind or None)


# --------------------------------------------------------------------------- request schema

StrictInt = Annotated[int, Field(strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions (the subset this server implements; `top_k` is an extension)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, strict=True)
    top_p: float = Field(1.0, gt=0, le=1, strict=True)
    top_k: StrictInt | None = Field(None, ge=0)
    n: StrictInt = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    user: str | None = None


# --------------------------------------------------------------------------- rate limit


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()

    def take(self) -> float:
        """-> 0 when allowed, else seconds until a token is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, rps: float, burst: float | None, max_clients: int = 10000):
        self.rps, self.burst = rps, burst if burst is not None else max(1.0, rps)
        self.buckets: dict[str, TokenBucket] = {}
        self.max_clients = max_clients

    def check(self, client: str) -> float:
        if self.rps <= 0:
            return 0.0
        b = self.buckets.get(client)
        if b is None:
            if len(self.buckets) >= self.max_clients:  # forget idle clients (full buckets)
                now = time.monotonic()
                self.buckets = {k: v for k, v in self.buckets.items()
                                if v.tokens + (now - v.t) * v.rate < v.burst}
            b = self.buckets[client] = TokenBucket(self.rps, self.burst)
        return b.take()


# --------------------------------------------------------------------------- the app

app = FastAPI(title="raygpt", docs_url="/docs", redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError):
    e = _validation_error(list(exc.errors()))
    return JSONResponse(e.body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, kind),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _load_engine(model_dir: str, s: ServerSettings, name: str):
    """Load a model dir and return a started, warmed-up Engine (raises ModelDirError/UserError)."""
    import torch

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.model.io import TOKENIZER, ModelDirError, load_model_dir
    from raygpt.serving.engine import Engine, SamplingParams

    device = s.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(s.dtype, "bad")
    if dtype == "bad":
        raise UserError(f"dtype {s.dtype!r}: use float32, bfloat16 or float16")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model, meta = load_model_dir(model_dir, device=device, dtype=dtype)
    if not (Path(model_dir) / TOKENIZER).is_file():
        raise ModelDirError(f"model directory {model_dir!r} has no {TOKENIZER}")
    tok = load_tokenizer(Path(model_dir) / TOKENIZER)
    if tok.vocab_size > model.config.vocab_size:
        raise ModelDirError(f"{model_dir!r}: tokenizer has {tok.vocab_size} tokens but the model "
                            f"only {model.config.vocab_size}")
    eng = Engine(model, tok, max_slots=s.max_slots, max_waiting=s.max_waiting,
                 version=meta.get("version"), name=name, step_delay_s=s.step_delay_s).start()
    try:  # warm up (and prove the model runs) before it takes traffic
        r = eng.submit([0], SamplingParams(max_tokens=1, temperature=0), loop=False)
        r.result(timeout=300)
    except BaseException:
        eng.abort()
        raise
    eng.meta = meta
    eng.model_dir = str(model_dir)
    eng.loaded_at = int(time.time())
    return eng


@serve.deployment(
    name="GPTServer",
    max_ongoing_requests=64,
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(app)
class GPTServer:
    def __init__(self, settings: dict | None = None):
        self.s = ServerSettings.from_args(settings)
        if self.s.num_threads:
            import torch

            torch.set_num_threads(self.s.num_threads)
        self.api_key: str | None = None
        if self.s.api_key_env:
            self.api_key = os.environ.get(self.s.api_key_env) or None
            if not self.api_key:  # fail closed: an API key was asked for but is not there
                raise UserError(f"api_key_env={self.s.api_key_env!r} is set but that environment "
                                "variable is empty in the replica")
        self.limiter = RateLimiter(self.s.rate_limit_rps, self.s.rate_limit_burst)
        self.engine = None
        self.last_error: dict | None = None
        self.retired: list = []  # engines draining after a swap (their stats still count)
        self._reconf_lock = asyncio.Lock()
        self._totals = {"decode_steps": 0, "tokens_generated": 0, "requests_finished": 0,
                        "prefills": 0}
        self._n_engines = 0
        self._init_model_dir = self.s.model_dir
        # Serve calls reconfigure(user_config) right after __init__ when there is one
        # (build_app always sets it). Without one, the first request loads args.model_dir.

    # ----------------------------------------------------------------- model lifecycle

    async def _swap_in(self, model_dir: str):
        self._n_engines += 1
        eng = await asyncio.to_thread(_load_engine, model_dir, self.s, f"engine{self._n_engines}")
        old, self.engine = self.engine, eng
        log.info("raygpt: serving model %s (version %s)", model_dir, eng.version)
        if old is not None:
            self.retired.append(old)
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()
        return eng

    def _retire(self, old):
        old.close(wait=True)  # in-flight requests finish on the old model
        st = old.stats()
        for k in self._totals:
            self._totals[k] += st[k]
        self.retired = [e for e in self.retired if e is not old]
        log.info("raygpt: retired model version %s", old.version)

    async def reconfigure(self, user_config: dict | None):
        user_config = dict(user_config or {})
        unknown = set(user_config) - {"model_dir"}
        model_dir = user_config.get("model_dir") or self.s.model_dir
        async with self._reconf_lock:
            if unknown:
                self.last_error = {"model_dir": model_dir, "error": f"unknown user_config keys "
                                   f"{sorted(unknown)} (known: ['model_dir'])", "time": int(time.time())}
                log.error("raygpt: %s", self.last_error["error"])
            if not model_dir:
                raise UserError("no model_dir: set args.model_dir or user_config.model_dir")
            if self.engine is not None and model_dir == self.engine.model_dir:
                return
            try:
                await self._swap_in(model_dir)
                self.last_error = None
            except Exception as e:
                msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                self.last_error = {"model_dir": model_dir, "error": msg, "time": int(time.time())}
                if self.engine is not None:
                    log.error("raygpt: refused model update to %s, still serving %s: %s",
                              model_dir, self.engine.model_dir, msg)
                    return
                # No model yet (replica start): fall back to args.model_dir when it differs.
                if self._init_model_dir and self._init_model_dir != model_dir:
                    log.error("raygpt: cannot load %s (%s); falling back to %s",
                              model_dir, msg, self._init_model_dir)
                    await self._swap_in(self._init_model_dir)
                    return
                raise

    async def _current_engine(self):
        if self.engine is None and self.s.model_dir:
            await self.reconfigure(None)
        if self.engine is None:
            raise ApiError(503, "no model is loaded yet", "server_error", code="model_not_ready")
        return self.engine

    def check_health(self):
        if self.engine is not None and (self.engine._thread is None
                                        or not self.engine._thread.is_alive()):
            raise RuntimeError("the generation engine thread died")

    # ----------------------------------------------------------------- request guards

    @staticmethod
    def _client_id(request: Request) -> str:
        # The client's address as the Serve proxy saw it (one server-wide API key cannot
        # tell clients apart). Behind a load balancer every client shares its address.
        c = request.client
        return c.host if c else "unknown"

    def _guard(self, request: Request) -> None:
        if self.api_key:
            auth = request.headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    key.strip().encode(), self.api_key.encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                               "invalid_request_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        wait = self.limiter.check(self._client_id(request))
        if wait > 0:
            raise ApiError(429, f"rate limit of {self.s.rate_limit_rps:g} requests/s exceeded",
                           "requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    async def _read_body(self, request: Request) -> bytes:
        limit = self.s.max_body_bytes
        too_big = ApiError(413, f"request body is larger than {limit} bytes",
                           code="request_too_large")
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > limit:
                    raise too_big
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    # ----------------------------------------------------------------- endpoints

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        html = (STATIC / "playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{ROOT}}", root).replace("{{MODEL}}", self.s.model_name)
                            .replace("{{AUTH}}", "true" if self.api_key else "false"))

    @app.get("/healthz")
    async def healthz(self):
        try:
            e = await self._current_engine()
        except Exception as ex:
            return JSONResponse({"status": "unavailable", "error": str(ex)}, status_code=503)
        return {"status": "ok", "version": e.version, "model": self.s.model_name}

    def _model_card(self) -> dict:
        e = self.engine
        card = {"id": self.s.model_name, "object": "model", "owned_by": "raygpt",
                "created": getattr(e, "loaded_at", None)}
        if e is not None:
            card.update(version=e.version, model_dir=e.model_dir,
                        context_length=e.block_size, vocab_size=e.cfg.vocab_size)
        card["last_update_error"] = self.last_error
        return card

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._guard(request)
        await self._current_engine()
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        self._guard(request)
        await self._current_engine()
        if model_id != self.s.model_name:
            raise ApiError(404, f"model {model_id!r} does not exist (this server serves "
                           f"{self.s.model_name!r})", param="model", code="model_not_found")
        return self._model_card()

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        self._guard(request)
        engines = [e for e in self.retired] + ([self.engine] if self.engine else [])
        totals = dict(self._totals)
        per = []
        for e in engines:
            st = e.stats()
            per.append(st)
            for k in totals:
                totals[k] += st[k]
        cur = self.engine.stats() if self.engine else None
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            replica = None
        return {"totals": totals, "current": cur, "engines": per, "replica": replica}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        self._guard(request)
        body = await self._read_body(request)
        try:
            req = CompletionRequest.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e.errors()) from None
        engine = await self._current_engine()
        if req.model is not None and req.model != self.s.model_name:
            raise ApiError(404, f"model {req.model!r} does not exist (this server serves "
                           f"{self.s.model_name!r})", param="model", code="model_not_found")
        prompts = self._prompts(req.prompt)
        if len(prompts) > self.s.max_prompts:
            raise ApiError(400, f"at most {self.s.max_prompts} prompts per request", param="prompt")
        if req.n > self.s.max_n:
            raise ApiError(400, f"n={req.n} is above the limit of {self.s.max_n}", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        if any(not s for s in stop):
            raise ApiError(400, "stop sequences must not be empty", param="stop")
        reqs, engine = await self._submit_all(engine, prompts, req, stop)
        # prompt tokens count once per prompt (its n choices share it)
        n_prompt = sum(len(reqs[k * req.n].prompt_ids) for k in range(len(prompts)))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created,
                "model": self.s.model_name, "system_fingerprint": engine.version}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(reqs, base, include_usage, n_prompt),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        from raygpt.serving.engine import EngineError

        try:
            results = await asyncio.gather(*(r.aresult() for r in reqs))
        except EngineError as e:
            raise ApiError(500, f"generation failed: {e}", "server_error") from None
        finally:
            for r in reqs:
                if not r.done:
                    r.cancel()
        choices = [{"index": i, "text": res.text, "logprobs": None,
                    "finish_reason": res.finish_reason} for i, res in enumerate(results)]
        n_comp = sum(res.completion_tokens for res in results)
        return {**base, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_comp,
                          "total_tokens": n_prompt + n_comp}}

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _prompts(prompt) -> list:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # one prompt given as token ids
        for p in prompt:
            if not p:
                raise ApiError(400, "prompt must not contain empty prompts", param="prompt")
        return list(prompt)

    async def _submit_all(self, engine, prompts, req: CompletionRequest, stop):
        from raygpt.serving.engine import (EngineClosed, EngineOverloaded, InvalidRequest,
                                           SamplingParams)

        limit = self.s.max_tokens_limit or engine.block_size
        if req.max_tokens > limit:
            raise ApiError(400, f"max_tokens={req.max_tokens} is above the limit of {limit}",
                           param="max_tokens", code="max_tokens_too_large")
        for attempt in range(5):
            reqs = []
            try:
                for p in prompts:
                    for j in range(req.n):
                        sp = SamplingParams(
                            max_tokens=req.max_tokens, temperature=req.temperature,
                            top_k=req.top_k or None, top_p=req.top_p, stop=stop,
                            seed=None if req.seed is None else req.seed + j)
                        reqs.append(engine.submit(p, sp))
                return reqs, engine
            except EngineClosed:  # a model swap happened between picking and submitting
                for r in reqs:
                    r.cancel()
                engine = await self._current_engine()
                continue
            except InvalidRequest as e:
                for r in reqs:
                    r.cancel()
                raise ApiError(400, str(e), param=e.param, code=e.code) from None
            except UserError as e:
                for r in reqs:
                    r.cancel()
                raise ApiError(400, str(e), param="prompt") from None
            except EngineOverloaded as e:
                for r in reqs:
                    r.cancel()
                raise ApiError(503, f"server overloaded: {e}", "server_error",
                               code="overloaded", headers={"Retry-After": "1"}) from None
        raise ApiError(503, "the model is being swapped, retry", "server_error",
                       headers={"Retry-After": "1"})

    async def _sse(self, reqs, base: dict, include_usage: bool, n_prompt: int):
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, r):
            try:
                async for ev in r.aevents():
                    await q.put((i, ev))
            except BaseException as e:  # pragma: no cover - surfaced as an error event
                from raygpt.serving.engine import Event

                await q.put((i, Event(finish_reason="error", error=str(e))))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)] if len(reqs) > 1 else []
        remaining = len(reqs)
        n_comp = 0
        try:
            if len(reqs) == 1:
                async def single():
                    async for ev in reqs[0].aevents():
                        yield 0, ev
                source = single()
            else:
                async def multi():
                    left = len(reqs)
                    while left:
                        i, ev = await q.get()
                        if ev.finish_reason is not None:
                            left -= 1
                        yield i, ev
                source = multi()
            async for i, ev in source:
                n_comp += len(ev.token_ids)
                if ev.finish_reason == "error":
                    yield "data: " + json.dumps(error_body(
                        f"generation failed: {ev.error}", "server_error")) + "\n\n"
                    remaining -= 1
                    continue
                if not ev.text and ev.finish_reason is None:
                    continue
                chunk = {**base, "choices": [{"index": i, "text": ev.text, "logprobs": None,
                                              "finish_reason": ev.finish_reason}]}
                yield "data: " + json.dumps(chunk) + "\n\n"
                if ev.finish_reason is not None:
                    remaining -= 1
            if include_usage:
                yield "data: " + json.dumps({**base, "choices": [], "usage": {
                    "prompt_tokens": n_prompt, "completion_tokens": n_comp,
                    "total_tokens": n_prompt + n_comp}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                if not r.done:
                    r.cancel()
            for t in tasks:
                t.cancel()


def make_app(args: dict | None = None, **deployment_options: Any):
    """The bound Serve application; deployment_options override the decorator's."""
    s = ServerSettings.from_args(args)
    opts: dict[str, Any] = {}
    if s.model_dir:
        opts["user_config"] = {"model_dir": s.model_dir}
    opts.update(deployment_options)
    return GPTServer.options(**opts).bind(asdict(s))


def build_app(args: dict) -> Any:
    """Entry point of `serve run` / `serve deploy` (import_path: raygpt.serving.app:build_app)."""
    return make_app(args)
