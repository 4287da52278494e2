"""Serving load benchmark against fair baselines, in the same run, over HTTP.

Three Serve apps on one local Ray, the same model, streaming /v1/completions-style SSE:

  engine   raygpt's app: continuous batching, KV cache, per-step token budget
  serial   (a) one request at a time WITH a KV cache (GPT.forward_cached per token)
  batch    (b) Ray Serve's @serve.batch over the same KV-cached generate, streamed per
           step: what a Ray user writes by hand (a batch runs to its longest request;
           requests arriving meanwhile wait for the next batch)

Clients: N concurrent streaming clients, staggered start (uniform over --stagger-s) and
varied output lengths (max_tokens uniform in [max_tokens/4, max_tokens]); temperature 0.8.
Reported per server and level: tokens/s, p50/p99 time to first token (TTFT) and p50/p99
inter-token latency (ITL: the gap between a stream's consecutive tokens).

Then the prefill-burst figure: 16 streams decoding while 16 distinct prompts of a full context
arrive; p50/p99/max ITL of the 16 streams' tokens during the burst (from the first long
prompt sent to the last one answered), engine with --step-tokens vs without a budget
(step_tokens = a whole burst: every admitted prompt prefilled before the next decode step,
the behaviour before the token budget).

    nice -n 5 python bench/serve_load.py                    # shakespeare-char shape, random init
    python bench/serve_load.py --concurrency 32,64 --max-tokens 128 --json out.json

Numbers, not pass/fail.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def build_model_dir(preset: str, out: Path, seed: int = 0) -> Path:
    import torch

    from raygpt.data.tokenizer import train_char_tokenizer
    from raygpt.model.gpt import GPT, GPTConfig
    from raygpt.model.io import save_model_dir
    from raygpt.presets import PRESETS

    text = (Path(__file__).resolve().parents[1] / "raygpt/assets/tinyshakespeare.txt").read_text()
    tok = train_char_tokenizer(text)
    tok_path = tok.save(out.parent / "tokenizer.json")
    m = PRESETS[preset]["model"]
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=m["n_layer"], n_head=m["n_head"], n_embd=m["n_embd"],
                          block_size=m["block_size"], vocab_size=tok.vocab_size))
    save_model_dir(model, out, tok_path)
    return out


# ------------------------------------------------------------------ baselines


def _sse(text: str, finish=None) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text,
                                               "finish_reason": finish}]}) + "\n\n"


def baseline_deployments():
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    class _Model:
        def _load(self, model_dir: str, num_threads: int | None):
            import torch

            from raygpt.data.tokenizer import load_tokenizer
            from raygpt.model.io import load_model_dir

            if num_threads:
                torch.set_num_threads(num_threads)
            self.torch = torch
            self.model, _ = load_model_dir(model_dir)
            self.model.eval()
            self.tok = load_tokenizer(Path(model_dir) / "tokenizer.json")

    @serve.deployment(name="Serial", max_ongoing_requests=1, ray_actor_options={"num_cpus": 1})
    class Serial(_Model):
        """(a) One request at a time, KV-cached: prefill once, then one position per token."""

        def __init__(self, model_dir: str, num_threads: int | None = None):
            self._load(model_dir, num_threads)

        def _prefill(self, ids):
            from raygpt.model.gpt import KVCache

            with self.torch.inference_mode():
                cache = KVCache(self.model.config, 1)
                z = self.torch.zeros(1, dtype=self.torch.long)
                return cache, self.model.forward_cached(ids, cache, z, z, last_only=True)[:, -1]

        def _decode(self, cache, tok, pos):
            with self.torch.inference_mode():
                z = self.torch.zeros(1, dtype=self.torch.long)
                p = self.torch.full((1,), pos, dtype=self.torch.long)
                return self.model.forward_cached(tok[:, None], cache, z, p)[:, -1]

        async def __call__(self, request: Request):
            from raygpt.model.gpt import sample_next

            body = await request.json()
            torch = self.torch
            ids = torch.tensor([self.tok.encode(body["prompt"])])
            n = ids.shape[1]
            max_new = min(body["max_tokens"], self.model.config.block_size - n)
            gen = torch.Generator().manual_seed(body.get("seed", 0))

            async def stream():
                cache, logits = await asyncio.to_thread(self._prefill, ids)
                for i in range(max_new):
                    nxt = sample_next(logits, body["temperature"], None, None, gen)
                    yield _sse(self.tok.decode([int(nxt[0])]),
                               "length" if i == max_new - 1 else None)
                    if i < max_new - 1:
                        logits = await asyncio.to_thread(self._decode, cache, nxt, n + i)
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

    @serve.deployment(name="Batch", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
    class Batch(_Model):
        """(b) @serve.batch over the KV-cached generate, one yield per decode step."""

        def __init__(self, model_dir: str, num_threads: int | None = None):
            self._load(model_dir, num_threads)

        def _prefill(self, prompts):
            from raygpt.model.gpt import KVCache

            torch = self.torch
            ids = [self.tok.encode(p) for p in prompts]
            T = max(len(x) for x in ids)
            B = len(ids)
            x = torch.zeros((B, T), dtype=torch.long)
            for i, r in enumerate(ids):  # left-aligned; a row's logits at its own last position
                x[i, :len(r)] = torch.tensor(r)
            with torch.inference_mode():
                cache = KVCache(self.model.config, B)
                logits = self.model.forward_cached(x, cache, torch.arange(B),
                                                   torch.zeros(B, dtype=torch.long))
            last = logits[torch.arange(B), torch.tensor([len(r) - 1 for r in ids])]
            return cache, last, [len(r) for r in ids]

        def _decode(self, cache, toks, pos):
            torch = self.torch
            with torch.inference_mode():
                B = toks.shape[0]
                return self.model.forward_cached(toks[:, None], cache, torch.arange(B),
                                                 torch.tensor(pos))[:, -1]

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02)
        async def generate(self, bodies: list[dict]):
            from raygpt.model.gpt import sample_next

            cache, logits, lens = await asyncio.to_thread(self._prefill,
                                                          [b["prompt"] for b in bodies])
            bs = self.model.config.block_size
            limits = [min(b["max_tokens"], bs - n) for b, n in zip(bodies, lens)]
            for step in range(max(limits)):
                toks = sample_next(logits, bodies[0]["temperature"])
                out = []
                for i, t in enumerate(toks.tolist()):
                    if step >= limits[i]:
                        out.append(StopIteration)
                    else:
                        out.append(_sse(self.tok.decode([t]),
                                        "length" if step == limits[i] - 1 else None))
                yield out
                if step < max(limits) - 1:
                    pos = [min(n + step, bs - 1) for n in lens]
                    logits = await asyncio.to_thread(self._decode, cache, toks, pos)

        async def __call__(self, request: Request):
            body = await request.json()

            async def stream():
                async for chunk in self.generate(body):
                    yield chunk
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

    return Serial, Batch


# ------------------------------------------------------------------ load generator


async def one_request(client, url, prompt, max_tokens, seed):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True}
    t0 = time.perf_counter()
    ttft, tokens, stamps, done = None, 0, [], False
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "ttft": None, "tokens": 0, "itl": []}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            j = json.loads(data)
            text = "".join(c.get("text") or "" for c in j.get("choices", []))
            if text:
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - t0
                # a chunk may carry several tokens (char vocab: one per character)
                stamps.extend([now] * len(text))
                tokens += len(text)
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"status": 200 if done else -1, "ttft": ttft, "tokens": tokens, "itl": itl,
            "stamps": stamps}


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def run_level(url, clients, per_client, prompts, max_tokens, stagger_s, seed=0):
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results = []
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        async def worker(w):
            await asyncio.sleep(rng.uniform(0, stagger_s))
            for k in range(per_client):
                n = rng.randint(max(1, max_tokens // 4), max_tokens)
                results.append(await one_request(client, url, rng.choice(prompts), n,
                                                 seed=w * 1000 + k))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "ok": len(ok), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99)}


async def prefill_burst(url, short_prompts, long_prompts, n_streams=16):
    """p99 ITL of n_streams running streams while full-context prompts arrive (distinct:
    the engine prefills a prompt shared by several requests once)."""
    import httpx

    limits = httpx.Limits(max_connections=n_streams + len(long_prompts) + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        streams = [asyncio.create_task(one_request(client, url, short_prompts[i], 150, seed=i))
                   for i in range(n_streams)]
        await asyncio.sleep(1.0)  # the streams are decoding
        t_burst = time.perf_counter()
        longs = [asyncio.create_task(one_request(client, url, p, 4, seed=100 + i))
                 for i, p in enumerate(long_prompts)]
        await asyncio.gather(*longs)
        t_end = time.perf_counter()
        res = await asyncio.gather(*streams)
    # the gaps of the running streams that end while the long prompts are being served
    itl = [b - a for r in res for a, b in zip(r["stamps"], r["stamps"][1:])
           if t_burst <= b <= t_end]
    return {"itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
            "itl_max_ms": 1000 * max(itl, default=float("nan")), "gaps": len(itl),
            "burst_s": t_end - t_burst}


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="an exported model dir (default: random-init --preset)")
    ap.add_argument("--preset", default="shakespeare-char",
                    help="model shape for the random-init model (default 6L/6H/384, block 256)")
    ap.add_argument("--concurrency", default="32,64")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--stagger-s", type=float, default=2.0, help="client start spread")
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--step-tokens", type=int, default=256, help="engine token budget per step")
    ap.add_argument("--num-threads", type=int, default=1, help="torch threads per replica")
    ap.add_argument("--servers", default="engine,serial,batch")
    ap.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                    help="the engine loop in its own process (serve arg engine_process)")
    ap.add_argument("--no-burst", action="store_true", help="skip the prefill-burst figure")
    ap.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from raygpt.data.tokenizer import load_tokenizer
    from raygpt.serving.app import make_app

    if not args.port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    tmp = tempfile.TemporaryDirectory(prefix="raygpt-bench-")
    model_dir = Path(args.model_dir) if args.model_dir else build_model_dir(
        args.preset, Path(tmp.name) / "model")
    model_dir = model_dir.resolve()
    cfg = json.loads((model_dir / "config.json").read_text())["model"]
    tok = load_tokenizer(model_dir / "tokenizer.json")
    text = (Path(__file__).resolve().parents[1] / "raygpt/assets/tinyshakespeare.txt").read_text()
    rng = random.Random(0)
    bs = cfg["block_size"]
    plen = max(1, min(32, bs - args.max_tokens))

    def sample_prompt(n):
        while True:
            i = rng.randrange(0, len(text) - n)
            p = text[i:i + n]
            try:
                tok.encode(p)
                return p
            except Exception:
                continue

    prompts = [sample_prompt(plen) for _ in range(256)]  # one length: fair to (b)'s batching
    max_tokens = min(args.max_tokens, bs - plen)
    print(f"model: {model_dir.name} {cfg} | prompt {plen} tokens, max_tokens "
          f"{max_tokens // 4}..{max_tokens}", flush=True)

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             log_to_driver=False)
    out: dict = {"model": cfg, "rows": [], "burst": {}}
    servers = [s for s in args.servers.split(",") if s]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        base = f"http://127.0.0.1:{args.port}"
        settings = {"model_dir": str(model_dir), "max_slots": args.max_slots,
                    "num_threads": args.num_threads, "max_waiting": 1024,
                    "engine_process": args.engine_process}
        urls = {}
        if "engine" in servers:
            serve.run(make_app({**settings, "step_tokens": args.step_tokens},
                               max_ongoing_requests=256), name="engine", route_prefix="/engine")
            urls["engine"] = f"{base}/engine/v1/completions"
        Serial, Batch = baseline_deployments()
        if "serial" in servers:
            serve.run(Serial.bind(str(model_dir), args.num_threads), name="serial",
                      route_prefix="/serial")
            urls["serial"] = f"{base}/serial"
        if "batch" in servers:
            serve.run(Batch.bind(str(model_dir), args.num_threads), name="batch",
                      route_prefix="/batch")
            urls["batch"] = f"{base}/batch"
        for url in urls.values():  # warm-up
            asyncio.run(run_level(url, 2, 1, prompts, 8, 0.0))
        levels = [int(c) for c in args.concurrency.split(",") if c]
        for c in levels:
            for name, url in urls.items():
                r = asyncio.run(run_level(url, c, args.requests_per_client, prompts, max_tokens,
                                          args.stagger_s, seed=c))
                r["server"] = name
                out["rows"].append(r)
                print(f"{name:7} c={c:3}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 "
                      f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms  ITL p50/p99 "
                      f"{r['itl_p50_ms']:.0f}/{r['itl_p99_ms']:.0f} ms  ok {r['ok']}/{r['requests']}",
                      flush=True)
        if not args.no_burst and "engine" in servers:
            short = [sample_prompt(8) for _ in range(16)]
            long_prompts = [sample_prompt(bs - 4) for _ in range(16)]
            for label, step_tokens in (("token budget", args.step_tokens),
                                       ("no budget", 16 * bs)):
                serve.run(make_app({**settings, "step_tokens": step_tokens},
                                   max_ongoing_requests=256), name="burst", route_prefix="/burst")
                url = f"{base}/burst/v1/completions"
                asyncio.run(run_level(url, 2, 1, prompts, 8, 0.0))
                b = asyncio.run(prefill_burst(url, short, long_prompts))
                b["step_tokens"] = step_tokens
                out["burst"][label] = b
                print(f"burst, {label} (step_tokens {step_tokens}): ITL p50/p99/max "
                      f"{b['itl_p50_ms']:.0f}/{b['itl_p99_ms']:.0f}/{b['itl_max_ms']:.0f} ms "
                      f"over {b['gaps']} gaps in {b['burst_s']:.1f} s", flush=True)
                serve.delete("burst")
    finally:
        serve.shutdown()
        ray.shutdown()

    hdr = (f"{'server':8} {'clients':>7} {'ok':>7} {'tokens':>7} {'tok/s':>8} {'x serial':>8} "
           f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in out["rows"]:
        ser = next((x for x in out["rows"] if x["server"] == "serial"
                    and x["clients"] == r["clients"]), None)
        ratio = r["tokens_per_s"] / ser["tokens_per_s"] if ser and ser["tokens_per_s"] else float("nan")
        print(f"{r['server']:8} {r['clients']:>7} {r['ok']:>3}/{r['requests']:<3} {r['tokens']:>7} "
              f"{r['tokens_per_s']:>8.1f} {ratio:>8.1f} {r['ttft_p50_ms']:>7.0f}ms "
              f"{r['ttft_p99_ms']:>7.0f}ms {r['itl_p50_ms']:>6.0f}ms {r['itl_p99_ms']:>6.0f}ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
