"""Ray Serve deployment: OpenAI-compatible routes over the continuous-batching engine.

    serve run serve/debug.yaml                      # config file (import_path: build_app)
    serve run raygpt.serving.app:build_app model_dir=/abs/path/to/model
    raygpt serve /abs/path/to/model --port 8000     # the same, one command

Routes: POST /v1/completions, POST /v1/chat/completions (stream or not), GET /v1/models,
POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health, GET /healthz,
GET /metrics (Prometheus), GET /v1/stats (engine counters), GET / (playground page),
GET /admin/model (model_dir, last_update_error), GET /docs, GET /openapi.json. With API
keys set, everything but /, /health and /healthz needs one (public_metrics, public_docs).

Model updates: `user_config: {model_dir: ..., version: ...}`, swapped in while the old
model serves; a refused update keeps the old model, its error in GET /admin/model only
(models.py).

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}: 4xx for every
bad input, and a catch-all 500 (same shape) for bugs, which cancels what the request had
submitted to the engine.

The parts (like vLLM's entrypoints/openai): this module holds the FastAPI app, its
middleware and error handlers, and the routes; guards.py what a request must pass
(keys, limits, body, request shape), models.py the model lifecycle, responses.py the
OpenAI response and SSE formatting.
"""
# No `from __future__ import annotations` here: FastAPI must resolve the endpoint
# annotations (`request: Request`) of the class Serve wraps; as strings they turn into
# query parameters. Everything GPTServer uses is defined above it: @serve.deployment
# pickles the class (and what its globals hold) when the decorator runs.
import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygpt.errors import UserError
from raygpt.serving import adapter, responses
from raygpt.serving.guards import Guards, admit, bad_request, drop_keys, encode_all
from raygpt.serving.models import ModelManager
from raygpt.serving.protocol import (ApiError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, TokenizeRequest, error_body, parse,
                                     validation_error)
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
        self.guards = Guards(self.s)
        from raygpt.serving.metrics import ServerMetrics

        try:
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = "raygpt"
        self.metrics = ServerMetrics(app_name)
        app.state.metrics = self.metrics
        # Serve calls reconfigure(user_config) right after __init__ when there is one
        # (build_app always sets it). Without one, the first request loads args.model_dir.
        self.lifecycle = ModelManager(self.s, self.metrics, app_name)
        self.lifecycle.watch_drain_in_replica()

    async def reconfigure(self, user_config: dict | None):
        await self.lifecycle.reconfigure(user_config)

    def check_health(self):
        self.lifecycle.check_health()

    # ----------------------------------------------------------------- small routes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self, request: Request):
        root = request.scope.get("root_path", "").rstrip("/")
        html = (STATIC / "playground.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{ROOT}}", root).replace("{{MODEL}}", self.s.model_name)
                            .replace("{{AUTH}}", "true" if self.guards.api_keys else "false"))

    @app.get("/healthz")
    async def healthz(self):
        try:
            e = await self.lifecycle.current()
            self.lifecycle.check_health()
            if self.lifecycle.draining:
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
            self.guards.auth(request)
        self.lifecycle.engine_gauges()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        if not self.s.public_docs:
            self.guards.auth(request)
        return JSONResponse(request.app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        if not self.s.public_docs:
            self.guards.auth(request)
        from fastapi.openapi.docs import get_swagger_ui_html

        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="raygpt")

    @app.get("/admin/model", include_in_schema=False)
    async def admin_model(self, request: Request):
        """The model card with model_dir and last_update_error (raygpt promote reads it)."""
        self.guards.auth(request, self.guards.admin_keys)
        return self.lifecycle.card(admin=True)  # also with no model loaded: why not

    @app.get("/v1/models")
    async def models(self, request: Request):
        self.guards.check(request)
        await self.lifecycle.current()
        return {"object": "list", "data": [self.lifecycle.card()]}

    @app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        self.guards.check(request)
        await self.lifecycle.current()
        self.guards.check_model(model_id)
        return self.lifecycle.card()

    @app.get("/v1/stats")
    async def stats(self, request: Request):
        self.guards.check(request)
        return self.lifecycle.stats()

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        self.guards.check(request)
        body = await self.guards.read_body(request)
        # vLLM's field; our tokenizers add no special tokens
        data = drop_keys(body, ("add_special_tokens", "add_generation_prompt"))
        req = parse(TokenizeRequest, data)
        self.guards.check_model(req.model)
        e = await self.lifecycle.current()
        text = req.prompt if req.prompt is not None else e.chat_template.render(req.messages)
        try:
            ids = e.tokenizer.encode(text)
        except UserError as ex:
            raise ApiError(400, str(ex), param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": e.block_size}

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        self.guards.check(request)
        req = parse(DetokenizeRequest, await self.guards.read_body(request))
        self.guards.check_model(req.model)
        e = await self.lifecycle.current()
        try:
            return {"prompt": e.tokenizer.decode(req.tokens)}
        except UserError as ex:
            raise ApiError(400, str(ex), param="tokens") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info(self, request: Request):
        self.guards.check(request)
        e = await self.lifecycle.current()
        eos = e.eos_id
        return {"tokenizer_class": type(e.tokenizer).__name__, "vocab_size": e.tokenizer.vocab_size,
                "model_max_length": e.block_size, "eos_token": None if eos is None
                else e.tokenizer.decode([eos]), "bos_token": None, "pad_token": None}

    # ----------------------------------------------------------------- generation

    async def _admitted(self, request: Request, model):
        """The guards every generation passes, in order: key and request rate, drain,
        the client's concurrency slot, the body, the model name. -> (client, request,
        engine)."""
        client = self.guards.check(request)
        admit(self.lifecycle.draining)
        self.guards.hold_slot(request, client)
        req = self.guards.parse(model, await self.guards.read_body(request))
        self.guards.check_model(req.model)
        return client, req, await self.lifecycle.current()

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        client, req, engine = await self._admitted(request, CompletionRequest)
        prompts = self.guards.completion_prompts(req.prompt)
        max_tokens = self.guards.max_tokens(req, engine.block_size, chat=False)
        return await self._generate(request, client, engine, prompts, req, max_tokens,
                                    req.stop_list(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        client, req, engine = await self._admitted(request, ChatCompletionRequest)
        max_tokens = self.guards.max_tokens(req, engine.block_size, chat=True)
        tpl = engine.chat_template
        prompt = tpl.render(req.messages)
        own = req.stop_list()  # a list even when `stop` is one string (`in` on a str: substring)
        stop = own + [s for s in tpl.stop if s not in own]
        return await self._generate(request, client, engine, [prompt], req, max_tokens, stop,
                                    chat=True)

    async def _generate(self, request, client, engine, prompts, req, max_tokens, stop, chat):
        fan = self.guards.check_fanout(len(prompts), req.n)
        # each prompt encoded once, and the tokens charged before anything is queued
        params = adapter.sampling_params(req, max_tokens, stop, 0)  # choice 0's; once
        ids = encode_all(engine, prompts, params)
        n_prompt = sum(len(x) for x in ids)
        self.guards.charge_tokens(client, n_prompt + max_tokens * fan)
        reqs, engine = await self._submit_all(request, engine, prompts, ids, req, params)
        base = responses.response_base(chat, req.stream, self.s.model_name, engine.version)
        fmt = responses.ChoiceFormat(engine, req, chat, prompts)
        if req.stream:
            return responses.streaming_response(reqs, base, n_prompt, fmt)
        from raygpt.serving.engine import EngineError

        try:
            results = await asyncio.gather(*(r.aresult() for r in reqs))
        except EngineError as e:
            raise ApiError(500, f"generation failed: {e}", "server_error") from None
        finally:
            for r in reqs:
                if not r.done:
                    r.cancel()
        return responses.full_response(base, fmt, results, n_prompt)

    async def _submit_all(self, request, engine, prompts, ids, req, params):
        """Every choice of every prompt into the engine (each recorded for CatchAll);
        resubmitted to the new engine when a model swap closed the one picked."""
        from raygpt.serving.engine import EngineClosed, EngineOverloaded

        for attempt in range(5):
            reqs = []
            if attempt:  # another model now: its tokenizer may split the prompts otherwise
                ids = encode_all(engine, prompts, params)
            try:
                for p in ids:
                    for j in range(req.n):
                        r = engine.submit(p, adapter.choice_params(params, j))
                        reqs.append(r)
                        request.state.submitted.append(r)
                return reqs, engine
            except BaseException as e:
                for r in reqs:
                    r.cancel()
                if isinstance(e, EngineClosed):  # a swap between picking and submitting
                    engine = await self.lifecycle.current()
                    continue
                if isinstance(e, UserError):  # the engine's InvalidRequest included
                    raise bad_request(e) from None
                if isinstance(e, EngineOverloaded):
                    raise ApiError(503, f"server overloaded: {e}", "server_error",
                                   code="overloaded", headers={"Retry-After": "1"}) from None
                raise
        raise ApiError(503, "the model is being swapped, retry", "server_error",
                       headers={"Retry-After": "1"})


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
