"""What a request must pass before it reaches the engine (like the auth middleware of
vLLM's api_server and OpenAIServing's _check_model / _validate_input): the API key, the
per-client request rate, concurrency and token rate (the buckets are limits.py's), the
body's size and read timeout, the model name, request parsing (unknown fields ignored
with a warning unless strict_requests), and the request-shape limits (prompts,
max_tokens, n, fan-out). Every refusal is an OpenAI-shaped ApiError.
"""
import asyncio
import hmac
import json
import logging
import os

from fastapi import Request

from raygpt.errors import UserError
from raygpt.serving import adapter
from raygpt.serving.limits import ConcurrencyLimiter, RateLimiter, TooManyConcurrent
from raygpt.serving.protocol import ApiError, parse
from raygpt.serving.settings import ServerSettings

log = logging.getLogger("ray.serve")


def load_keys(env: str | None, kv: str | None) -> list[str]:
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


def _retry_after(wait: float) -> dict:
    return {"Retry-After": str(max(1, int(wait + 0.999)))}


class Guards:
    """One replica's keys and per-client limiters, and the checks that use them."""

    def __init__(self, s: ServerSettings):
        self.s = s
        self.api_keys = load_keys(s.api_key_env, s.api_key_kv)
        self.admin_keys = load_keys(s.admin_key_env, None) or self.api_keys
        self.limiter = RateLimiter(s.rate_limit_rps, s.rate_limit_burst)
        self.token_limiter = RateLimiter(s.rate_limit_tps, s.rate_limit_token_burst)
        self.concurrency = ConcurrencyLimiter(s.max_concurrent_per_client)
        self._ignored_seen: set = set()  # request fields warned about (once each)

    def client_id(self, request: Request, key: str | None) -> str:
        if key is not None:
            return "key:" + key
        h = self.s.trusted_proxy_header
        if h and request.headers.get(h):
            # the right-most entry is the one our trusted proxy appended
            return "ip:" + request.headers[h].split(",")[-1].strip()
        c = request.client
        return "ip:" + (c.host if c else "unknown")

    def auth(self, request: Request, keys: list[str] | None = None) -> str | None:
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

    def check(self, request: Request) -> str:
        """Auth and the request-rate limit. -> the client id (for the token limit)."""
        client = self.client_id(request, self.auth(request))
        wait = self.limiter.check(client)
        if wait > 0:
            raise ApiError(429, f"rate limit of {self.s.rate_limit_rps:g} requests/s exceeded",
                           "requests", code="rate_limit_exceeded", headers=_retry_after(wait))
        return client

    def hold_slot(self, request: Request, client: str) -> None:
        """The per-client concurrency cap; CatchAll releases the slot when the request ends
        (streams included)."""
        try:
            request.state.release.append(self.concurrency.acquire(client))
        except TooManyConcurrent:
            raise ApiError(429, f"more than {self.s.max_concurrent_per_client} concurrent "
                           "requests from this client (max_concurrent_per_client)", "requests",
                           code="too_many_concurrent_requests",
                           headers={"Retry-After": "1"}) from None

    def charge_tokens(self, client: str, tokens: int) -> None:
        """Charged in full before anything reaches the engine; a request above the burst
        waits for a full bucket and leaves it in debt (limits.TokenBucket). No-op with
        the token limit off."""
        if self.s.rate_limit_tps <= 0:
            return
        wait = self.token_limiter.check(client, tokens)
        if wait > 0:
            burst = self.token_limiter.burst
            raise ApiError(429, f"token rate limit of {self.s.rate_limit_tps:g} tokens/s (burst "
                           f"{burst:g}) exceeded (this request: {tokens} prompt + max completion "
                           f"tokens; retry in {wait:.1f} s)", "tokens", code="rate_limit_exceeded",
                           headers=_retry_after(wait))

    async def read_body(self, request: Request) -> bytes:
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

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.s.model_name:
            raise ApiError(404, f"model {name!r} does not exist (this server serves "
                           f"{self.s.model_name!r})", param="model", code="model_not_found")

    def parse(self, model, body: bytes):
        """The request, with fields it does not know ignored (a warning once per field
        name) unless strict_requests."""
        ignored: list[str] = []
        req = parse(model, body, strict=self.s.strict_requests, ignored=ignored)
        new = sorted(set(ignored) - self._ignored_seen)
        if new:
            self._ignored_seen.update(new)
            log.warning("ignoring request fields this server does not know: %s", ", ".join(new))
        return req

    # ------------------------------------------------------------- request-shape limits

    def completion_prompts(self, prompt) -> list:
        """/v1/completions' prompt -> its prompts (text or token ids); 400 on an empty
        one or more than max_prompts."""
        prompts = _prompts(prompt)
        if len(prompts) > self.s.max_prompts:
            raise ApiError(400, f"at most {self.s.max_prompts} prompts per request", param="prompt")
        return prompts

    def max_tokens(self, req, block_size: int, chat: bool) -> int:
        """The request's max_tokens (or max_completion_tokens), within max_tokens_limit
        (default: the context length). Completions: 0 only with echo; chat: none given =
        the limit."""
        limit = self.s.max_tokens_limit or block_size
        max_tokens = req.max_completion_tokens or req.max_tokens
        if not chat:
            if max_tokens == 0 and not req.echo:
                raise ApiError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
            adapter.check_max_tokens(max_tokens, limit)
            return max_tokens
        if max_tokens is not None:
            adapter.check_max_tokens(max_tokens, limit, "max_completion_tokens"
                                     if req.max_completion_tokens else "max_tokens")
        return max_tokens or limit

    def check_fanout(self, n_prompts: int, n: int) -> int:
        """n and prompts x n within max_n and max_fanout. -> prompts x n."""
        fan = n_prompts * n
        if n > self.s.max_n:
            raise ApiError(400, f"n={n} is above the limit of {self.s.max_n}", param="n")
        if fan > self.s.max_fanout:
            raise ApiError(400, f"{n_prompts} prompts x n={n} = {fan} generations is above "
                           f"this server's limit of {self.s.max_fanout} per request", param="n",
                           code="fanout_too_large")
        return fan


def admit(draining: bool) -> None:
    """New generations get 503 once the replica drains."""
    if draining:
        raise ApiError(503, "the server is shutting down", "server_error", code="draining",
                       headers={"Retry-After": "1"})


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


def drop_keys(body: bytes, keys: tuple[str, ...]) -> bytes:
    """The JSON body without these top-level keys (as it came when it is no JSON object)."""
    try:
        d = json.loads(body)
    except ValueError:
        return body
    if isinstance(d, dict):
        for k in keys:
            d.pop(k, None)
        return json.dumps(d).encode()
    return body


def bad_request(e: UserError) -> ApiError:
    """A request the engine (InvalidRequest, naming its param) or the tokenizer refuses
    -> 400."""
    from raygpt.serving.engine import InvalidRequest

    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e), param=e.param, code=e.code)
    return ApiError(400, str(e), param="prompt")


def encode_all(engine, prompts: list, params) -> list[list[int]]:
    """Token ids of each prompt (400 on a bad prompt or bad sampling params: checked
    here so that a refused request is not charged)."""
    try:
        params.validate(engine.cfg.vocab_size)
        return [engine.encode(p) for p in prompts]
    except UserError as e:
        raise bad_request(e) from None
