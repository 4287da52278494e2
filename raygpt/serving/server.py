"""Ray Serve deployment: OpenAI-compatible routes over the continuous-batching engine.

    serve run serve/debug.yaml                      # config file (import_path: build_app)
    serve run raygpt.serving.app:build_app model_dir=/abs/path/to/model
    raygpt serve /abs/path/to/model --port 8000     # the same, one command

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health, GET /healthz,
GET /metrics (Prometheus), GET /v1/stats (engine counters), GET / (playground page),
GET /admin/model (model_dir, last_update_error), GET /docs, GET /openapi.json. With API
keys set, everything but /, /health and /healthz needs one (public_metrics, public_docs).

Model updates: `user_config: {model_dir: ..., version: ...}`. `reconfigure` loads the new
directory in a thread while the old engine keeps serving, warms it up, then swaps it in;
requests hold the engine they started on, so in-flight requests finish on the old model.
The same path with a new version (a re-export) is reloaded; a directory that fails to
load, or whose version is not the one asked for, is refused: the old model keeps serving
and the error shows in GET /admin/model (`last_update_error`; GET /v1/models shows clients
neither paths nor errors). Each replica publishes what it
serves in Ray's KV store (`replica_state`), so promote can check every replica.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}: 4xx for every
bad input, and a catch-all 500 (same shape) for bugs, which cancels what the request had
submitted to the engine.
"""
# No `from __future__ import annotations` here: FastAPI must resolve the endpoint
# annotations (`request: Request`) of the class Serve wraps; as strings they turn into
# query parameters. Everything GPTServer uses is defined above it: @serve.deployment
# pickles the class (and what its globals hold) when the decorator runs.
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygpt.errors import UserError
from raygpt.serving import adapter
from raygpt.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, TokenizeRequest, error_body, parse,
                                     validation_error)
from raygpt.serving.limits import ConcurrencyLimiter, RateLimiter, TooManyConcurrent
from raygpt.serving.replicas import drain_requested, state_key
from raygpt.serving.settings import ServerSettings

log = logging.getLogger("ray.serve")

STATIC = Path(__file__).parent / "static"


# --------------------------------------------------------------------------- the app

# /docs and /openapi.json are GPTServer routes: behind the API key unless public_docs
app = FastAPI(title="raygpt", docs_url=None, openapi_url=None, redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError):
    return JSONResponse(validation_error(list(exc.errors())).body(), status_code=400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, kind),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


class CatchAll:
    """A bug never answers with a plain-text 500 nor leaves engine work without a reader:
    cancel what the request submitted (`request.state.submitted`) and answer in the OpenAI
    error shape. Pure ASGI (BaseHTTPMiddleware would re-buffer every SSE chunk); also
    counts /v1/* responses by status for the metrics.

    However the request ends (answered, failed, or cancelled by a client disconnect:
    asyncio.CancelledError is no Exception, and a stream cancelled before its generator
    ran never reaches the generator's `finally`), nothing reads its engine requests any
    more: cancel the unfinished ones so their slots free, and run `request.state.release`
    (the per-client concurrency slot)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["submitted"], state["release"] = [], []
        status = None

        async def send_and_record(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception as e:  # noqa: BLE001 - the last line of defence
            for r in state["submitted"]:
                r.cancel()
            log.exception("raygpt: unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if status is None:  # nothing sent yet: answer; else the stream just ends
                status = 500
                await JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                              "server_error", None, "internal_error"),
                                   status_code=500)(scope, receive, send)
        finally:
            for r in state["submitted"]:
                if not r.done:
                    r.cancel()
            for release in state["release"]:
                release()
            # scope["app"]: the app Serve runs (a copy of the module's `app`, pickled with
            # the deployment), where GPTServer put its metrics
            m = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if m is not None and status is not None and "/v1/" in scope.get("path", ""):
                m.request(status)


app.add_middleware(CatchAll)


class _ChoiceFormat:
    """Engine results -> OpenAI choices (completions' text + legacy logprobs, with echo;
    chat's message/delta + logprobs.content)."""

    def __init__(self, engine, req, chat: bool, prompts: list):
        self.tok, self.req, self.chat, self.n = engine.tokenizer, req, chat, req.n
        self.echo = (not chat) and req.echo
        self.logprobs = req.logprobs if chat else req.logprobs is not None
        self.prompts = [p if isinstance(p, str) else self.tok.decode(p) for p in prompts]
        self.streams: dict[int, adapter.LegacyLogprobs] = {}
        self.started: set[int] = set()
        self.wants_every_token = bool(self.logprobs)

    def _prompt(self, i: int) -> str:
        return self.prompts[i // self.n]

    def full(self, i: int, res) -> dict:
        if self.chat:
            c = {"index": i, "message": {"role": "assistant", "content": res.text,
                                          "refusal": None},
                 "logprobs": adapter.chat_logprobs(self.tok, res.logprobs) if self.logprobs
                 else None, "finish_reason": res.finish_reason}
            return c
        text = (self._prompt(i) if self.echo else "") + res.text
        lp = None
        if self.logprobs:
            L = adapter.LegacyLogprobs(self.tok)
            lp = L.part((res.prompt_logprobs or []) + (res.logprobs or []))
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": res.finish_reason}

    def stream_start(self, base: dict, n: int) -> list[dict]:
        if self.chat:  # the role first, like OpenAI
            return [{**base, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]} for i in range(n)]
        return []

    def delta(self, i: int, ev, r) -> dict:
        if self.chat:
            return {"index": i, "delta": {"content": ev.text} if ev.text else {},
                    "logprobs": adapter.chat_logprobs(self.tok, ev.logprobs)
                    if self.logprobs else None, "finish_reason": ev.finish_reason}
        text, entries = ev.text, list(ev.logprobs)
        if i not in self.started:
            self.started.add(i)
            if self.echo:
                text = self._prompt(i) + text
                entries = (r.prompt_logprobs or []) + entries
        lp = None
        if self.logprobs:
            L = self.streams.setdefault(i, adapter.LegacyLogprobs(self.tok))
            lp = L.part(entries)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}


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


def _drop(body: bytes, keys: tuple[str, ...]) -> bytes:
    try:
        d = json.loads(body)
    except ValueError:
        return body
    if isinstance(d, dict):
        for k in keys:
            d.pop(k, None)
        return json.dumps(d).encode()
    return body


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


def _load_keys(env: str | None, kv: str | None) -> list[str]:
    """Comma-separated keys from an environment variable and/or a Ray KV entry (where
    `raygpt serve --address` puts them: the Serve config then holds only the entry's
    name). Fails closed: a source that is named but empty is an error, not "no auth"."""
    keys: list[str] = []
    for name, raw in ((env, lambda n: os.environ.get(n)), (kv, _kv_text)):
        if not name:
            continue
        got = [k.strip() for k in (raw(name) or "").split(",") if k.strip()]
        if not got:
            where = "environment variable" if name == env else "Ray KV entry"
            raise UserError(f"API keys: the {where} {name!r} is empty or missing in the replica")
        keys += got
    return keys


def _kv_text(name: str) -> str | None:
    from raygpt.raycompat import kv_get

    v = kv_get(name)
    return v.decode() if v else None


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
        self.api_keys = _load_keys(self.s.api_key_env, self.s.api_key_kv)
        self.admin_keys = _load_keys(self.s.admin_key_env, None) or self.api_keys
        self.limiter = RateLimiter(self.s.rate_limit_rps, self.s.rate_limit_burst)
        self.token_limiter = RateLimiter(self.s.rate_limit_tps, self.s.rate_limit_token_burst)
        self.concurrency = ConcurrencyLimiter(self.s.max_concurrent_per_client)
        from raygpt.serving.metrics import ServerMetrics

        try:
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = "raygpt"
        self.app_name = app_name
        self.metrics = ServerMetrics(app_name)
        app.state.metrics = self.metrics
        self.engine = None
        self.last_error: dict | None = None
        self.retired: list = []  # engines draining after a swap (their stats still count)
        self.draining = False
        self._ignored_seen: set = set()  # request fields warned about (once each)
        self._reconf_lock = asyncio.Lock()
        self._totals = {"decode_steps": 0, "tokens_generated": 0, "requests_finished": 0,
                        "prefills": 0}
        self._n_engines = 0
        self._init_model_dir = self.s.model_dir
        # Serve calls reconfigure(user_config) right after __init__ when there is one
        # (build_app always sets it). Without one, the first request loads args.model_dir.
        if _replica_id() is not None:
            threading.Thread(target=self._watch_drain, daemon=True).start()

    # ----------------------------------------------------------------- model lifecycle

    def _fault_hook(self):
        """Testing aid (settings.fault_file): steps fail while the file names this replica
        (or '*'), standing in for a broken accelerator."""
        path, me = self.s.fault_file, _replica_id()

        def hook():
            try:
                who = Path(path).read_text().split()
            except OSError:
                return
            if "*" in who or me in who:
                raise RuntimeError(f"injected device failure ({path})")
        return hook

    async def _swap_in(self, model_dir: str, want_version: str | None = None):
        self._n_engines += 1
        eng = await asyncio.to_thread(adapter.load_engine, model_dir, self.s,
                                      f"engine{self._n_engines}", self.metrics)
        if want_version and eng.version != want_version:
            eng.abort()
            raise UserError(f"{model_dir} holds version {eng.version}, not the {want_version} "
                            "this update asked for (changed while promoting?)")
        if self.s.fault_file:
            eng.fault_hook = self._fault_hook()
        old, self.engine = self.engine, eng
        log.info("raygpt: serving model %s (version %s)", model_dir, eng.version)
        self._publish()
        if old is not None:
            self.retired.append(old)
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()
        return eng

    def _publish(self) -> None:
        """What this replica serves, in Ray's KV store (promote checks every replica;
        a draining driver waits for every replica's `idle`)."""
        rid = _replica_id()
        if rid is None:
            return
        try:
            from raygpt.raycompat import kv_put

            kv_put(state_key(self.app_name, rid), json.dumps(
                {"model_dir": getattr(self.engine, "model_dir", None),
                 "version": getattr(self.engine, "version", None),
                 "last_update_error": self.last_error, "draining": self.draining, "idle": self._idle(),
                 "time": time.time()}).encode())
        except Exception as e:  # noqa: BLE001 - observability only
            log.warning("raygpt: cannot publish replica state: %s", e)

    def _idle(self) -> bool:
        return all(e.idle for e in [self.engine, *self.retired] if e is not None)

    def _watch_drain(self) -> None:
        """Polls the app's drain key (set by `raygpt serve` on SIGTERM, see replicas.py):
        from then on new requests get 503, and the replica republishes whether it is idle."""
        while True:
            time.sleep(0.5)  # one KV read per replica per 0.5 s
            try:
                if self.draining or drain_requested(self.app_name):
                    if not self.draining:
                        log.info("raygpt: draining: new requests get 503 until this replica stops")
                    self.draining = True
                    self._publish()
            except Exception:  # noqa: BLE001 - Ray shutting down: nothing left to drain
                return

    def _retire(self, old):
        old.close(wait=True)  # in-flight requests finish on the old model
        st = old.stats()
        for k in self._totals:
            self._totals[k] += st[k]
        self.retired = [e for e in self.retired if e is not old]
        log.info("raygpt: retired model version %s", old.version)

    async def reconfigure(self, user_config: dict | None):
        user_config = dict(user_config or {})
        unknown = set(user_config) - {"model_dir", "version"}
        model_dir = user_config.get("model_dir") or self.s.model_dir
        want = user_config.get("version")
        async with self._reconf_lock:
            if unknown:
                self.last_error = {"model_dir": model_dir, "error": f"unknown user_config keys "
                                   f"{sorted(unknown)} (known: ['model_dir', 'version'])",
                                   "time": int(time.time())}
                log.error("raygpt: %s", self.last_error["error"])
            if not model_dir:
                raise UserError("no model_dir: set args.model_dir or user_config.model_dir")
            if self.engine is not None and model_dir == self.engine.model_dir:
                # the same path: reload only when what it holds changed (a re-export)
                try:
                    from raygpt.model.io import read_model_config

                    on_disk = read_model_config(model_dir).get("version")
                except Exception:  # noqa: BLE001 - a broken dir: keep serving what we have
                    on_disk = self.engine.version
                if on_disk == self.engine.version and want in (None, self.engine.version):
                    return
            try:
                await self._swap_in(model_dir, want)
                self.last_error = None
                self._publish()
            except Exception as e:
                msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                self.last_error = {"model_dir": model_dir, "error": msg, "time": int(time.time())}
                self._publish()
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
        e = self.engine
        if e is None:
            return
        if e._thread is None or not e._thread.is_alive():
            raise RuntimeError("the generation engine thread died")
        if e.consecutive_failed_steps >= self.s.max_failed_steps:
            raise RuntimeError(f"{e.consecutive_failed_steps} engine steps in a row failed "
                               "(a broken device?): replace this replica")

    # ----------------------------------------------------------------- request guards

    def _client_id(self, request: Request, key: str | None) -> str:
        if key is not None:
            return "key:" + key
        h = self.s.trusted_proxy_header
        if h and request.headers.get(h):
            # the right-most entry is the one our trusted proxy appended
            return "ip:" + request.headers[h].split(",")[-1].strip()
        c = request.client
        return "ip:" + (c.host if c else "unknown")

    def _auth(self, request: Request, keys: list[str] | None = None) -> str | None:
        """-> the API key given (None when the server has none); 401 without a valid one."""
        keys = self.api_keys if keys is None else keys
        if not keys:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given_b = given.strip().encode()
        key = next((k for k in keys if hmac.compare_digest(given_b, k.encode())), None)
        if scheme.lower() != "bearer" or key is None:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return key

    def _guard(self, request: Request) -> str:
        """Auth and the request-rate limit. -> the client id (for the token limit)."""
        client = self._client_id(request, self._auth(request))
        wait = self.limiter.check(client)
        if wait > 0:
            raise ApiError(429, f"rate limit of {self.s.rate_limit_rps:g} requests/s exceeded",
                           "requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})
        return client

    def _hold_slot(self, request: Request, client: str) -> None:
        """The per-client concurrency cap; CatchAll releases the slot when the request ends
        (streams included)."""
        try:
            request.state.release.append(self.concurrency.acquire(client))
        except TooManyConcurrent:
            raise ApiError(429, f"more than {self.s.max_concurrent_per_client} concurrent "
                           "requests from this client (max_concurrent_per_client)", "requests",
                           code="too_many_concurrent_requests",
                           headers={"Retry-After": "1"}) from None

    def _charge_tokens(self, client: str, tokens: int) -> None:
        """Charged in full before anything reaches the engine; a request above the burst
        waits for a full bucket and leaves it in debt (limits.TokenBucket)."""
        wait = self.token_limiter.check(client, tokens)
        if wait > 0:
            burst = self.token_limiter.burst
            raise ApiError(429, f"token rate limit of {self.s.rate_limit_tps:g} tokens/s (burst "
                           f"{burst:g}) exceeded (this request: {tokens} prompt + max completion "
                           f"tokens; retry in {wait:.1f} s)", "tokens", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    async def _read_body(self, request: Request) -> bytes:
        """The body, within max_body_bytes (413) and body_timeout_s (408: a slow upload
        must not hold a replica's request slot)."""
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
        try:
            async with asyncio.timeout(self.s.body_timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > limit:
                        raise too_big
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.s.body_timeout_s:g} s "
                           "(body_timeout_s)", code="request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.s.model_name:
            raise ApiError(404, f"model {name!r} does not exist (this server serves "
                           f"{self.s.model_name!r})", param="model", code="model_not_found")

    # ----------------------------------------------------------------- small routes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        html = (STATIC / "playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{ROOT}}", root).replace("{{MODEL}}", self.s.model_name)
                            .replace("{{AUTH}}", "true" if self.api_keys else "false"))

    @app.get("/healthz")
    async def healthz(self):
        try:
            e = await self._current_engine()
            self.check_health()
            if self.draining:
                raise ApiError(503, "draining: not admitting new requests", "server_error",
                               code="draining")
        except ApiError as ex:
            return JSONResponse(ex.body(), status_code=503)
        except Exception as ex:  # noqa: BLE001
            return JSONResponse(error_body(str(ex), "server_error", None, "unhealthy"),
                                status_code=503)
        return {"status": "ok", "version": e.version, "model": self.s.model_name}

    @app.get("/health")
    async def health(self):
        r = await self.healthz()
        return r if isinstance(r, Response) else Response(status_code=200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(self, request: Request):
        if not self.s.public_metrics:  # no rate limit: a scraper must not be refused
            self._auth(request)
        self._engine_gauges()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if not self.s.public_docs:
            self._auth(request)
        return JSONResponse(request.app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        if not self.s.public_docs:
            self._auth(request)
        from fastapi.openapi.docs import get_swagger_ui_html

        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="raygpt")

    def _engine_gauges(self):
        if self.engine is not None:
            st = self.engine.stats()
            self.metrics.engine_state(st["waiting"], st["active"])

    def _model_card(self, admin: bool = False) -> dict:
        """The served model; where it was loaded from and why the last update was refused
        only for admins (/admin/model): clients see no paths on the server nor its errors."""
        e = self.engine
        card = {"id": self.s.model_name, "object": "model", "owned_by": "raygpt",
                "created": getattr(e, "loaded_at", None)}
        if e is not None:
            card.update(version=e.version,
                        context_length=e.block_size, max_model_len=e.block_size, vocab_size=e.cfg.vocab_size,
                        replica=_replica_id())
        if admin:
            card.update(model_dir=getattr(e, "model_dir", None), last_update_error=self.last_error)
        return card

    @app.get("/admin/model", include_in_schema=False)
    async def admin_model(self, request: Request):
        """The model card with model_dir and last_update_error (raygpt promote reads it)."""
        self._auth(request, self.admin_keys)
        return self._model_card(admin=True)  # also with no model loaded: why not

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._guard(request)
        await self._current_engine()
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        self._guard(request)
        await self._current_engine()
        self._check_model(model_id)
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
        return {"totals": totals, "current": cur, "engines": per, "replica": _replica_id()}

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        self._guard(request)
        body = await self._read_body(request)
        # vLLM's field; our tokenizers add no special tokens
        data = _drop(body, ("add_special_tokens", "add_generation_prompt"))
        req = parse(TokenizeRequest, data)
        self._check_model(req.model)
        e = await self._current_engine()
        text = req.prompt if req.prompt is not None else e.chat_template.render(req.messages)
        try:
            ids = e.tokenizer.encode(text)
        except UserError as ex:
            raise ApiError(400, str(ex), param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": e.block_size}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        self._guard(request)
        req = parse(DetokenizeRequest, await self._read_body(request))
        self._check_model(req.model)
        e = await self._current_engine()
        try:
            return {"prompt": e.tokenizer.decode(req.tokens)}
        except UserError as ex:
            raise ApiError(400, str(ex), param="tokens") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        self._guard(request)
        e = await self._current_engine()
        eos = e.eos_id
        return {"tokenizer_class": type(e.tokenizer).__name__, "vocab_size": e.tokenizer.vocab_size,
                "model_max_length": e.block_size, "eos_token": None if eos is None
                else e.tokenizer.decode([eos]), "bos_token": None, "pad_token": None}

    # ----------------------------------------------------------------- generation

    def _admit(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="draining",
                           headers={"Retry-After": "1"})

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        client = self._guard(request)
        self._admit()
        self._hold_slot(request, client)
        req = self._parse(CompletionRequest, await self._read_body(request))
        self._check_model(req.model)
        engine = await self._current_engine()
        prompts = _prompts(req.prompt)
        if len(prompts) > self.s.max_prompts:
            raise ApiError(400, f"at most {self.s.max_prompts} prompts per request", param="prompt")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        adapter.check_max_tokens(max_tokens, self.s.max_tokens_limit or engine.block_size)
        return await self._generate(request, client, engine, prompts, req, max_tokens,
                                    req.stop_list(), chat=False)

    def _parse(self, model, body: bytes):
        """The request, with fields it does not know ignored (a warning once per field
        name) unless strict_requests."""
        ignored: list[str] = []
        req = parse(model, body, strict=self.s.strict_requests, ignored=ignored)
        new = sorted(set(ignored) - self._ignored_seen)
        if new:
            self._ignored_seen.update(new)
            log.warning("ignoring request fields this server does not know: %s", ", ".join(new))
        return req

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        client = self._guard(request)
        self._admit()
        self._hold_slot(request, client)
        req = self._parse(ChatCompletionRequest, await self._read_body(request))
        self._check_model(req.model)
        engine = await self._current_engine()
        limit = self.s.max_tokens_limit or engine.block_size
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None:
            adapter.check_max_tokens(max_tokens, limit, "max_completion_tokens"
                                     if req.max_completion_tokens else "max_tokens")
        tpl = engine.chat_template
        prompt = tpl.render(req.messages)
        stop = req.stop_list() + [s for s in tpl.stop if s not in (req.stop or [])]
        return await self._generate(request, client, engine, [prompt], req,
                                    max_tokens or limit, stop, chat=True)

    async def _generate(self, request, client, engine, prompts, req, max_tokens, stop, chat):
        fan = len(prompts) * req.n
        if req.n > self.s.max_n:
            raise ApiError(400, f"n={req.n} is above the limit of {self.s.max_n}", param="n")
        if fan > self.s.max_fanout:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} = {fan} generations is above "
                           f"this server's limit of {self.s.max_fanout} per request", param="n",
                           code="fanout_too_large")
        # each prompt encoded once, and the tokens charged before anything is queued
        ids = self._encode_all(engine, prompts, adapter.sampling_params(req, max_tokens, stop, 0))
        n_prompt = sum(len(x) for x in ids)
        if self.s.rate_limit_tps > 0:
            self._charge_tokens(client, n_prompt + max_tokens * fan)
        reqs, engine = await self._submit_all(request, engine, prompts, ids, req, max_tokens, stop)
        kind = ("chat.completion.chunk" if req.stream else "chat.completion") if chat else \
            "text_completion"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": self.s.model_name,
                "system_fingerprint": engine.version}
        fmt = _ChoiceFormat(engine, req, chat, prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(reqs, base, include_usage, n_prompt, fmt),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        from raygpt.serving.engine import EngineError

        try:
            results = await asyncio.gather(*(r.aresult() for r in reqs))
        except EngineError as e:
            raise ApiError(500, f"generation failed: {e}", "server_error") from None
        finally:
            for r in reqs:
                if not r.done:
                    r.cancel()
        if any(res.finish_reason == "cancelled" for res in results):
            # the engine stopped under it (a drain or a model swap): not a 200
            raise ApiError(503, "generation was cancelled (the replica is draining or swapping "
                           "models); retry", "server_error", code="cancelled", headers={"Retry-After": "1"})
        choices = [fmt.full(i, res) for i, res in enumerate(results)]
        n_comp = sum(res.completion_tokens for res in results)
        return {**base, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_comp,
                          "total_tokens": n_prompt + n_comp}}

    @staticmethod
    def _encode_all(engine, prompts: list, params) -> list[list[int]]:
        """Token ids of each prompt (400 on a bad prompt or bad sampling params: checked
        here so that a refused request is not charged)."""
        from raygpt.serving.engine import InvalidRequest

        try:
            params.validate(engine.cfg.vocab_size)
            return [engine.encode(p) for p in prompts]
        except InvalidRequest as e:
            raise ApiError(400, str(e), param=e.param, code=e.code) from None
        except UserError as e:
            raise ApiError(400, str(e), param="prompt") from None

    async def _submit_all(self, request, engine, prompts, ids, req, max_tokens, stop):
        from raygpt.serving.engine import EngineClosed, EngineOverloaded, InvalidRequest

        for attempt in range(5):
            reqs = []
            if attempt:  # another model now: its tokenizer may split the prompts otherwise
                ids = self._encode_all(engine, prompts,
                                       adapter.sampling_params(req, max_tokens, stop, 0))
            try:
                for p in ids:
                    for j in range(req.n):
                        sp = adapter.sampling_params(req, max_tokens, stop, j)
                        r = engine.submit(p, sp)
                        reqs.append(r)
                        request.state.submitted.append(r)
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
            except BaseException:
                for r in reqs:
                    r.cancel()
                raise
        raise ApiError(503, "the model is being swapped, retry", "server_error",
                       headers={"Retry-After": "1"})

    async def _sse(self, reqs, base: dict, include_usage: bool, n_prompt: int, fmt):
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, r):
            try:
                async for ev in r.aevents():
                    await q.put((i, ev))
            except BaseException as e:  # pragma: no cover - surfaced as an error event
                from raygpt.serving.engine import Event

                await q.put((i, Event(finish_reason="error", error=str(e))))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        n_comp = 0
        continuous = bool(getattr(fmt.req.stream_options, "continuous_usage_stats", False))
        try:
            for c in fmt.stream_start(base, len(reqs)):
                yield "data: " + json.dumps(c) + "\n\n"
            left = len(reqs)
            while left:
                i, ev = await q.get()
                if ev.finish_reason is not None:
                    left -= 1
                n_comp += len(ev.token_ids)
                if ev.finish_reason in ("error", "cancelled"):  # never a "cancelled" finish
                    why = (f"generation failed: {ev.error}" if ev.finish_reason == "error" else
                           "generation was cancelled (the replica is draining or swapping models); retry")
                    yield "data: " + json.dumps(error_body(why, "server_error")) + "\n\n"
                    continue
                if not ev.text and ev.finish_reason is None and not fmt.wants_every_token:
                    continue
                chunk = {**base, "choices": [fmt.delta(i, ev, reqs[i])]}
                if include_usage and continuous:  # vLLM's continuous_usage_stats
                    chunk["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_comp,
                                      "total_tokens": n_prompt + n_comp}
                yield "data: " + json.dumps(chunk) + "\n\n"
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
    return GPTServer.options(**opts).bind(s.model_dump())


def build_app(args: dict) -> Any:
    """Entry point of `serve run` / `serve deploy` (import_path: raygpt.serving.app:build_app)."""
    return make_app(args)
