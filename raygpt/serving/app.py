"""The Serve application's import path (`import_path: raygpt.serving.app:build_app`).

The app is split like vLLM's entrypoints/openai and Ray Serve LLM's builders:
  settings.py  ServerSettings: the app's `args`, one validated pydantic model
  protocol.py  the OpenAI wire format: request models, error shape
  adapter.py   the engine adapter: model dir -> started engine, chat template,
               request -> SamplingParams, results -> OpenAI choices' logprobs
  server.py    the deployment: routes, guards (auth, rate limits), model swap, SSE
  metrics.py   Prometheus metrics (Ray's export + GET /metrics)
  engine.py    the continuous-batching engine (pure torch)
"""
from raygpt.serving.protocol import ApiError, CompletionRequest, error_body  # noqa: F401
from raygpt.serving.server import GPTServer, app, build_app, make_app  # noqa: F401
from raygpt.serving.settings import ServerSettings  # noqa: F401
