"""Serving load benchmark: tokens/s and time-to-first-token under concurrent streaming clients.

Starts a local Ray + Serve, deploys the raygpt app (continuous batching, KV cache) and,
in the same run, a naive baseline deployment (one request at a time, no KV cache: a full
forward pass over the whole sequence for every new token), then drives both over HTTP
with streaming /v1/completions requests from N concurrent clients.

    python bench/serve_load.py                       # random-init shakespeare-char shape
    python bench/serve_load.py --model-dir out/model --concurrency 1,8,32,64
    python bench/serve_load.py --preset shakespeare-char-cpu --max-tokens 48

Numbers, not pass/fail. The goal for this machine: at 32 clients >= 10x the baseline's
tokens/s on CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_model_dir(preset: str, out: Path, seed: int = 0) -> Path:
    import torch

    from raygpt.data.tokenizer import train_char_tokenizer
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir
    from raygpt.model.presets import PRESETS

    text = (Path(__file__).resolve().parents[1] / "raygpt/assets/tinyshakespeare.txt").read_text()
    tok = train_char_tokenizer(text)
    tok_path = tok.save(out.parent / "tokenizer.json")
    m = PRESETS[preset]["model"]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=m["n_layer"], n_head=m["n_head"], n_embd=m["n_embd"],
                          block_size=m["block_size"], vocab_size=tok.vocab_size))
    return save_model_dir(model, out, tok_path)


# ------------------------------------------------------------------ naive baseline server

def naive_deployment():
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    @serve.deployment(name="Naive", max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
    class Naive:
        """One request at a time; every token recomputes the full sequence (no KV cache)."""

        def __init__(self, model_dir: str, num_threads: int | None = None):
            import torch

            from raygpt.data.tokenizer import load_tokenizer
            from raygpt.model.io import load_model_dir

            if num_threads:
                torch.set_num_threads(num_threads)
            self.model, _ = load_model_dir(model_dir)
            self.tok = load_tokenizer(Path(model_dir) / "tokenizer.json")
            self.torch = torch

        def _next(self, ids, temperature, gen):
            from raygpt.model.gpt import sample_next

            with self.torch.inference_mode():
                logits = self.model(ids[:, -self.model.config.block_size:])[:, -1]
            return sample_next(logits, temperature, None, None, gen)

        async def __call__(self, request: Request):
            body = await request.json()
            torch = self.torch
            ids = torch.tensor([self.tok.encode(body["prompt"])])
            n_prompt = ids.shape[1]
            max_new = min(body["max_tokens"], self.model.config.block_size - n_prompt)
            gen = torch.Generator().manual_seed(body.get("seed", 0))

            async def stream():
                nonlocal ids
                for _ in range(max_new):
                    nxt = await asyncio.to_thread(self._next, ids, body["temperature"], gen)
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    chunk = {"choices": [{"index": 0, "text": self.tok.decode([int(nxt[0])]),
                                          "finish_reason": None}]}
                    yield "data: " + json.dumps(chunk) + "\n\n"
                yield "data: " + json.dumps({"choices": [], "usage": {
                    "prompt_tokens": n_prompt, "completion_tokens": max_new,
                    "total_tokens": n_prompt + max_new}}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

    return Naive


# ------------------------------------------------------------------ load generator

async def one_request(client, url, prompt, max_tokens, seed):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "ttft": None, "tokens": 0, "latency": None}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            j = json.loads(data)
            if ttft is None and any(c.get("text") for c in j.get("choices", [])):
                ttft = time.perf_counter() - t0
            if j.get("usage"):
                tokens = j["usage"]["completion_tokens"]
    return {"status": 200 if done else -1, "ttft": ttft, "tokens": tokens,
            "latency": time.perf_counter() - t0}


async def run_level(url, concurrency, n_requests, prompts, max_tokens):
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        todo = list(range(n_requests))
        results = []

        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(client, url, prompts[i % len(prompts)],
                                                 max_tokens, seed=i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs, p):
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {"concurrency": concurrency, "requests": n_requests, "ok": len(ok),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50_ms": 1000 * pct(ttfts, 50), "ttft_p99_ms": 1000 * pct(ttfts, 99),
            "latency_p50_s": statistics.median([r["latency"] for r in ok]) if ok else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="an exported model dir (default: random-init --preset)")
    ap.add_argument("--preset", default="shakespeare-char",
                    help="model shape for the random-init model (default shakespeare-char: 6L/6H/384, block 256)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=float, default=2.0,
                    help="requests per level = max(4, concurrency * this)")
    ap.add_argument("--baseline-requests", type=int, default=4)
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads per replica")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.serving.app import make_app

    tmp = tempfile.TemporaryDirectory(prefix="raygpt-bench-")
    model_dir = Path(args.model_dir) if args.model_dir else build_model_dir(
        args.preset, Path(tmp.name) / "model")
    model_dir = model_dir.resolve()
    cfg = json.loads((model_dir / "config.json").read_text())["model"]
    tok = load_tokenizer(model_dir / "tokenizer.json")
    text = (Path(__file__).resolve().parents[1] / "raygpt/assets/tinyshakespeare.txt").read_text()
    rng = random.Random(0)
    plen = max(1, min(32, cfg["block_size"] - args.max_tokens))
    prompts = []
    while len(prompts) < 256:
        i = rng.randrange(0, len(text) - plen)
        p = text[i:i + plen]
        try:
            tok.encode(p)
        except Exception:
            continue
        prompts.append(p)
    max_tokens = min(args.max_tokens, cfg["block_size"] - plen)
    print(f"model: {model_dir} {cfg} | prompt {plen} tokens, max_tokens {max_tokens}", flush=True)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        threads = {"num_threads": args.num_threads} if args.num_threads else {}
        serve.run(make_app({"model_dir": str(model_dir), "max_slots": args.max_slots, **threads},
                           max_ongoing_requests=max(128, args.max_slots * 2)),
                  name="engine", route_prefix="/engine")
        serve.run(naive_deployment().bind(str(model_dir), args.num_threads),
                  name="naive", route_prefix="/naive")
        base = f"http://127.0.0.1:{args.port}"
        levels = [int(c) for c in args.concurrency.split(",") if c]

        # warm-up both
        asyncio.run(run_level(f"{base}/engine/v1/completions", 2, 2, prompts, 8))
        asyncio.run(run_level(f"{base}/naive", 1, 1, prompts, 8))

        rows = []
        b = asyncio.run(run_level(f"{base}/naive", 1, args.baseline_requests, prompts, max_tokens))
        b["server"] = "naive (1 at a time, no KV cache)"
        rows.append(b)
        print(f"baseline: {b['tokens_per_s']:.1f} tokens/s", flush=True)
        for c in levels:
            n = max(4, int(round(c * args.requests_per_client)))
            r = asyncio.run(run_level(f"{base}/engine/v1/completions", c, n, prompts, max_tokens))
            r["server"] = "raygpt engine"
            rows.append(r)
            print(f"engine c={c}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
        import httpx

        stats = httpx.get(f"{base}/engine/v1/stats", timeout=30).json()["totals"]
    finally:
        serve.shutdown()
        ray.shutdown()

    bt = rows[0]["tokens_per_s"]
    hdr = (f"{'server':34} {'clients':>7} {'reqs':>5} {'ok':>4} {'tokens':>7} {'tok/s':>9} "
           f"{'x base':>7} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11}")
    print()
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['server']:34} {r['concurrency']:>7} {r['requests']:>5} {r['ok']:>4} "
              f"{r['tokens']:>7} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / bt:>7.1f} "
              f"{r['ttft_p50_ms']:>11.1f} {r['ttft_p99_ms']:>11.1f}")
    print(f"\nengine counters: {stats['tokens_generated']} tokens in {stats['decode_steps']} "
          f"decode steps ({stats['tokens_generated'] / max(1, stats['decode_steps']):.1f} tokens/step)")
    r32 = next((r for r in rows[1:] if r["concurrency"] == 32), None)
    if r32:
        print(f"32 clients: {r32['tokens_per_s'] / bt:.1f}x the naive baseline (goal >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "engine_totals": stats,
                                               "model": cfg}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
