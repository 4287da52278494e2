"""The Serve application's import path (`import_path: raygpt.serving.app:build_app`).

The app is split like vLLM's entrypoints/openai and Ray Serve LLM's builders:
  settings.py  ServerSettings: the app's `args`, one validated pydantic model
  protocol.py  the OpenAI wire format: request models, error shape
  adapter.py   the engine adapter: model dir -> started engine, chat template,
               request -> SamplingParams, results -> OpenAI choices' logprobs
  server.py    the deployment: the FastAPI app, middleware, routes (thin handlers)
  guards.py    what a request must pass: API keys, rate/concurrency/token limits
               (limits.py's buckets), body size and read timeout, request shape
  models.py    the model lifecycle: load, swap, retire, drain, health, model card
  responses.py engine results -> OpenAI responses and chunks, usage, SSE
  metrics.py   Prometheus metrics (Ray's export + GET /metrics)
  engine.py    the continuous-batching engine (pure torch)
"""
from raygpt.serving.protocol import ApiError, CompletionRequest, error_body  # noqa: F401
from raygpt.serving.server import GPTServer, app, build_app, make_app  # noqa: F401
from raygpt.serving.settings import ServerSettings  # noqa: F401
