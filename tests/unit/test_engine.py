"""The continuous-batching engine, without Ray."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest
import torch

from raygpt.data.tokenizer import train_char_tokenizer
from raygpt.model.gpt import GPT, GPTConfig
from raygpt.serving.engine import (
    Engine,
    EngineClosed,
    InvalidRequest,
    PromptTooLong,
    SamplingParams,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n"


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    return m.eval()


@pytest.fixture
def engine(model, tok):
    e = Engine(model, tok, max_slots=8).start()
    yield e
    e.abort()


def reference(model, tok, prompt, n):
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, n, temperature=0.0)[0, ids.shape[1]:].tolist()
    return out


def test_greedy_equals_generate(engine, model, tok):
    for prompt, n in [("First", 20), ("hear me", 5), ("A", 63), ("Speak, speak.", 64)]:
        c = engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0))
        ref = reference(model, tok, prompt, n)
        assert c.token_ids == ref, prompt
        assert c.text == tok.decode(ref)
        assert c.prompt_tokens == len(prompt) and c.completion_tokens == len(ref)
    # prompt + max_tokens beyond the context: capped, finish_reason "length"
    c = engine.generate("Speak, speak.", SamplingParams(max_tokens=64, temperature=0))
    assert c.completion_tokens == 64 - len("Speak, speak.") and c.finish_reason == "length"


def test_continuous_batching(engine, model, tok):
    """Requests of different lengths submitted mid-flight share decode steps and still
    produce exactly the unbatched greedy output."""
    jobs = [("First", 40), ("Before we", 7), ("All", 25), ("hear", 50), ("me ", 3),
            ("speak", 33), ("proceed", 12), ("Citizen", 45), ("further", 20), ("A", 9)]
    before = engine.stats()
    reqs = []
    for i, (p, n) in enumerate(jobs):
        reqs.append(engine.submit(p, SamplingParams(max_tokens=n, temperature=0)))
        if i % 3 == 2:
            threading.Event().wait(0.01)  # later requests join a running batch
    outs = [r.result(timeout=60) for r in reqs]
    for (p, n), c in zip(jobs, outs):
        assert c.token_ids == reference(model, tok, p, n), p
        assert c.finish_reason == "length"
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    total = sum(c.completion_tokens for c in outs)
    assert total == sum(n for _, n in jobs)
    assert after["max_batch"] > 1
    assert steps < total / 2, (steps, total)
    assert after["active"] == 0 and after["waiting"] == 0


def test_more_requests_than_slots(model, tok):
    e = Engine(model, tok, max_slots=2).start()
    try:
        reqs = [e.submit("hear", SamplingParams(max_tokens=10, temperature=0)) for _ in range(7)]
        outs = [r.result(timeout=60) for r in reqs]
        assert all(o.token_ids == outs[0].token_ids for o in outs)
        assert e.stats()["max_batch"] == 2
    finally:
        e.abort()


def test_stop_strings(engine, tok):
    full = engine.generate("First", SamplingParams(max_tokens=30, temperature=0)).text
    stop = full[10:12]
    c = engine.generate("First", SamplingParams(max_tokens=30, temperature=0, stop=[stop, "QQQ"]))
    assert c.finish_reason == "stop"
    assert c.text == full[: full.index(stop)]
    assert stop not in c.text
    # streamed deltas add up to the same text (held-back partial matches are released)
    r = engine.submit("First", SamplingParams(max_tokens=30, temperature=0, stop=[stop]), loop=False)
    evs = list(r.events(timeout=30))
    assert "".join(e.text for e in evs) == c.text and evs[-1].finish_reason == "stop"
    # a stop string that never matches: the held-back prefix is flushed at the end
    c2 = engine.generate("First", SamplingParams(max_tokens=30, temperature=0,
                                                 stop=[full[-1] + "\u00e9"]))
    assert c2.text == full and c2.finish_reason == "length"


def test_seeds_reproducible(engine):
    p = SamplingParams(max_tokens=30, temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    a = engine.generate("hear", p)
    # the same seed while other requests share the batch gives the same tokens
    noise = [engine.submit("All", SamplingParams(max_tokens=40, temperature=1.0), loop=False)
             for _ in range(4)]
    b = engine.generate("hear", SamplingParams(**{**p.__dict__}))
    for r in noise:
        r.result(timeout=30)
    c = engine.generate("hear", SamplingParams(**{**p.__dict__, "seed": 99}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_rejections(engine, tok):
    with pytest.raises(PromptTooLong):
        engine.submit("a" * 65)
    with pytest.raises(InvalidRequest):
        engine.submit("")
    with pytest.raises(InvalidRequest):
        engine.submit("First", SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequest):
        engine.submit("First", SamplingParams(temperature=-1))
    with pytest.raises(InvalidRequest):
        engine.submit("First", SamplingParams(top_p=0))
    with pytest.raises(InvalidRequest):
        engine.submit([tok.vocab_size + 5])
    from raygpt.errors import UserError

    with pytest.raises(UserError):
        engine.submit("\u2603 unknown char")
    # a prompt that fills the whole context still yields one token, like GPT.generate
    c = engine.generate("a" * 64, SamplingParams(max_tokens=5, temperature=0))
    assert c.completion_tokens == 1 and c.finish_reason == "length"


def test_async_streaming_and_cancel(engine):
    async def main():
        r = engine.submit("First", SamplingParams(max_tokens=40, temperature=0))
        got = []
        async for ev in r.aevents():
            got.append(ev)
        assert got[-1].finish_reason == "length"
        assert sum(len(e.token_ids) for e in got) == 40
        # cancel mid-stream frees the slot
        r2 = engine.submit("First", SamplingParams(max_tokens=60, temperature=0))
        async for ev in r2.aevents():
            r2.cancel()
            if ev.finish_reason:
                break
        return ev

    ev = asyncio.run(main())
    assert ev.finish_reason in ("cancelled", "length")
    for _ in range(100):
        if engine.stats()["active"] == 0:
            break
        threading.Event().wait(0.01)
    assert engine.stats()["active"] == 0


def test_close_drains(model, tok):
    e = Engine(model, tok, max_slots=4).start()
    reqs = [e.submit("hear", SamplingParams(max_tokens=30, temperature=0), loop=False)
            for _ in range(6)]
    e.close(wait=False)
    with pytest.raises(EngineClosed):
        e.submit("hear")
    outs = [r.result(timeout=60) for r in reqs]
    assert all(o.finish_reason == "length" and o.completion_tokens == 30 for o in outs)
    e.close()
    assert not e._thread.is_alive()


def test_batched_prefill_mixed_lengths(model, tok):
    """Prompts admitted together are prefilled in one padded batch; outputs are unchanged."""
    e = Engine(model, tok, max_slots=8).start()
    try:
        jobs = [("A", 12), ("Speak, speak.", 20), ("hear me", 9), ("Before we proceed", 30),
                ("First Citizen:", 15), ("me", 40)]
        with e._cv:  # hold the engine loop so that all six are admitted in one iteration
            reqs = [e.submit(p, SamplingParams(max_tokens=n, temperature=0), loop=False)
                    for p, n in jobs]
        outs = [r.result(timeout=60) for r in reqs]
        for (p, n), c in zip(jobs, outs):
            assert c.token_ids == reference(model, tok, p, n), p
        st = e.stats()
        assert st["prefills"] >= 6 and st["prefill_batches"] <= st["prefills"] - 5
    finally:
        e.abort()


def test_chunked_prefill_token_budget(model, tok):
    """A step_tokens budget smaller than the prompts: prompts are prefilled in chunks
    across steps while running streams keep decoding; outputs are unchanged."""
    e = Engine(model, tok, max_slots=8, step_tokens=8, min_prefill_tokens=4).start()
    try:
        longs = [TEXT[i:i + 45] for i in (0, 3, 6, 9)]  # 45 tokens each, all different
        runner = e.submit("hear", SamplingParams(max_tokens=50, temperature=0), loop=False)
        next(runner.events(timeout=30))  # it is decoding
        with e._cv:
            before = e.decode_steps
            reqs = [e.submit(long, SamplingParams(max_tokens=5, temperature=0), loop=False)
                    for long in longs]
        outs = [r.result(timeout=60) for r in reqs]
        assert all(o.token_ids == reference(model, tok, long, 5) for long, o in zip(longs, outs))
        assert runner.result(timeout=60).token_ids == reference(model, tok, "hear", 50)
        st = e.stats()
        # 4 x 45 prompt tokens at <= 8 tokens a step: many steps, the stream decoding in each
        assert st["prefill_tokens"] >= 4 * 45 and st["decode_steps"] - before >= 4 * 45 // 8
    finally:
        e.abort()


def test_cancelled_waiting_request_leaves_queue_at_once(model, tok):
    e = Engine(model, tok, max_slots=1, step_delay_s=0.01).start()
    try:
        busy = e.submit("hear", SamplingParams(max_tokens=60, temperature=0), loop=False)
        next(busy.events(timeout=30))  # admitted: it holds the only slot
        waiting = e.submit("hear", SamplingParams(max_tokens=5), loop=False)
        assert e.stats()["waiting"] == 1
        waiting.cancel()
        assert e.stats()["waiting"] == 0  # not at the next admission: now
        assert [ev.finish_reason for ev in waiting.events(timeout=5)] == ["cancelled"]
        busy.cancel()
    finally:
        e.abort()


def test_tiny_temperature_seed_bounds_penalties_logprobs(engine, model, tok):
    ref = reference(model, tok, "First", 10)
    for t in (1e-300, 1e-9):
        assert engine.generate("First", SamplingParams(max_tokens=10, temperature=t)).token_ids == ref
    for seed in (2 ** 64, -(2 ** 63) - 1):
        with pytest.raises(InvalidRequest, match="seed"):
            engine.submit("First", SamplingParams(seed=seed))
    assert engine.generate("First", SamplingParams(max_tokens=3, seed=2 ** 64 - 1)).completion_tokens == 3
    c = engine.generate("First", SamplingParams(max_tokens=10, temperature=0, logprobs=2))
    assert [x.token_id for x in c.logprobs] == ref
    assert all(x.top[0][0] == x.token_id and len(x.top) == 2 for x in c.logprobs)
    # echo with max_tokens 0: prompt logprobs equal the full forward pass's
    c = engine.generate("First", SamplingParams(max_tokens=0, echo=True, logprobs=0))
    ids = torch.tensor([tok.encode("First")])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0].float(), -1)
    assert c.completion_tokens == 0 and c.prompt_logprobs[0].logprob is None
    assert [x.logprob for x in c.prompt_logprobs[1:]] == pytest.approx(
        [float(lp[i, ids[0, i + 1]]) for i in range(4)], abs=1e-5)
    # a strong frequency penalty stops greedy repetition
    rep = engine.generate("a", SamplingParams(max_tokens=20, temperature=0,
                                               logit_bias={tok.encode("e")[0]: 8.0}))
    pen = engine.generate("a", SamplingParams(max_tokens=20, temperature=0, frequency_penalty=2,
                                               logit_bias={tok.encode("e")[0]: 8.0}))
    assert rep.text.count("e") > pen.text.count("e")


def test_incremental_detokenization_matches_full_decode(model, tok):
    e = Engine(model, tok, max_slots=2).start()
    try:
        c = e.generate("All:", SamplingParams(max_tokens=60, temperature=1.0, seed=5))
        assert c.text == tok.decode(c.token_ids)
    finally:
        e.abort()


def test_vllm_sampling_extensions(engine, model, tok):
    """min_p, repetition_penalty, stop_token_ids (vLLM's semantics); a request's bias and
    penalty vectors are built once and kept up to date, not rebuilt every step."""
    ref = reference(model, tok, "First", 12)
    # min_p = 1: only the likeliest token survives, so sampling at temperature 1 is greedy
    c = engine.generate("First", SamplingParams(max_tokens=12, temperature=1.0, min_p=1.0, seed=3))
    assert c.token_ids == ref
    # a repetition penalty changes a greedy continuation that repeats its tokens
    rp = engine.generate("First", SamplingParams(max_tokens=12, temperature=0, repetition_penalty=5.0))
    assert rp.token_ids != ref
    assert len(set(rp.token_ids)) >= len(set(ref))
    # a token forced by logit_bias that is also a stop token ends the output at once
    x = tok.encode("z")[0]
    c = engine.generate("First", SamplingParams(max_tokens=12, temperature=0, logit_bias={x: 100.0},
                                                stop_token_ids=(x,)))
    assert c.finish_reason == "stop" and c.token_ids == [x] and c.text == ""
    with pytest.raises(InvalidRequest, match="min_p"):
        SamplingParams(min_p=1.5).validate()
    with pytest.raises(InvalidRequest, match="stop strings are limited"):
        SamplingParams(stop=["x" * 100_000]).validate()


def test_full_vocabulary_bias_is_built_once(model, tok, monkeypatch):
    """A full-vocabulary logit_bias: the vector is made on the request's first step and
    reused (the old path rebuilt it from the dict on every step)."""
    from raygpt.serving import engine as eng

    built = []
    init = eng._DenseRow.__init__
    monkeypatch.setattr(eng._DenseRow, "__init__", lambda self, *a: (built.append(1), init(self, *a))[1])
    e = Engine(model, tok, max_slots=4).start()
    try:
        bias = {t: -1.0 for t in range(tok.vocab_size)}
        bias[tok.encode("e")[0]] = 50.0
        p = SamplingParams(max_tokens=6, temperature=0, logit_bias=bias)
        # two choices of one request share the dict (adapter.choice_params): one vector
        r, r2 = (e.submit(tok.encode("First"), replace(p, seed=j), loop=False) for j in (0, 1))
        res = r.result(timeout=60)
        assert res.token_ids == tok.encode("eeeeee") and r2.result(timeout=60).token_ids == res.token_ids
        dense = r.dense
        assert dense is not None and dense.bias is not None and float(dense.bias.max()) == 50.0
        assert r2.dense.bias is dense.bias
        assert len(built) == 2  # one build per request for 6 steps
    finally:
        e.abort()


def test_wire_layer_imports_without_torch():
    """protocol.py (the wire layer) takes its limits from serving/constants.py, not from
    the engine, so importing it does not import torch; the engine still re-exports them."""
    import subprocess
    import sys

    code = ("import sys, raygpt.serving.protocol, raygpt.serving.request; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from raygpt.serving import constants, engine as eng

    assert eng.MAX_LOGPROBS == constants.MAX_LOGPROBS and eng.SEED_MAX == constants.SEED_MAX


_READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


def test_decode_step_reads_the_device_once(model, tok, monkeypatch):
    """Every Tensor -> Python read (what would be a host sync on a GPU) made while the
    engine runs a decode step, counted on the real engine: exactly one per step, the read
    of the sampled tokens (logprobs packed into the same transfer), whatever the mix of
    greedy, seeded, grouped, logprob, bias and penalty rows. The same for a prefill group."""
    from raygpt.serving import transfer

    counting = threading.local()
    reads: list[str] = []
    helper: list[int] = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if getattr(counting, "on", False):
                reads.append(name)
            return real(self, *a, **k)
        return wrapper

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    real_read = transfer.read_host
    monkeypatch.setattr(transfer, "read_host", lambda t: (helper.append(1), real_read(t))[1])

    e = Engine(model, tok, max_slots=8)
    per_step: list[tuple[int, int]] = []
    for meth in ("_decode", "_prefill_group"):
        real = getattr(e, meth)

        def wrapped(*a, _real=real, _meth=meth):
            before, hb = len(reads), len(helper)
            counting.on = True
            try:
                return _real(*a)
            finally:
                counting.on = False
                if _meth == "_decode":
                    per_step.append((len(reads) - before, len(helper) - hb))
                else:
                    prefill_reads.append(len(reads) - before)
        setattr(e, meth, wrapped)
    prefill_reads: list[int] = []
    e.start()
    try:
        x = tok.encode("e")[0]
        params = [
            SamplingParams(max_tokens=12, temperature=0),
            SamplingParams(max_tokens=12, temperature=0, logprobs=3),
            SamplingParams(max_tokens=12, temperature=0.8, seed=7, logprobs=1),
            SamplingParams(max_tokens=12, temperature=0.8, top_k=5),
            SamplingParams(max_tokens=12, temperature=0.8, top_k=5),
            SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, logit_bias={x: 2.0},
                           frequency_penalty=0.5, presence_penalty=0.5),
            SamplingParams(max_tokens=12, temperature=1.0, min_p=0.1, repetition_penalty=1.3),
            SamplingParams(max_tokens=12, temperature=0, echo=True, logprobs=2),
        ]
        with e._cv:  # admitted together: every decode step has the whole mix
            reqs = [e.submit("First", p, loop=False) for p in params]
        outs = [r.result(timeout=60) for r in reqs]
        assert all(o.completion_tokens == 12 for o in outs)
        assert outs[1].logprobs[0].top[0][0] == outs[1].token_ids[0] and len(outs[1].logprobs[0].top) == 3
        assert len(outs[7].prompt_logprobs) == len("First")
    finally:
        e.abort()
    steps = [s for s in per_step if s != (0, 0)]
    assert len(steps) >= 11, per_step
    assert all(s == (1, 1) for s in steps), (per_step, reads)
    # a prefill group: its sampled tokens, plus one read for an echo row's prompt logprobs
    assert prefill_reads and all(n <= 2 for n in prefill_reads), prefill_reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_has_no_other_sync_on_gpu(tok, monkeypatch):
    """On a GPU, CUDA's own sync check: a decode step that synchronizes anywhere but the
    read of its sampled tokens raises (the row then ends with an error)."""
    from raygpt.serving import transfer

    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64,
                      vocab_size=tok.vocab_size)).cuda().eval()
    real_read = transfer.read_host

    def read(t):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(t)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    monkeypatch.setattr(transfer, "read_host", read)
    e = Engine(m, tok, max_slots=4)
    real_decode = e._decode

    def decode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real_decode()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    e._decode = decode
    e.start()
    try:
        x = tok.encode("e")[0]
        reqs = [e.submit("First", p, loop=False) for p in (
            SamplingParams(max_tokens=8, temperature=0, logprobs=2),
            SamplingParams(max_tokens=8, temperature=0.8, seed=3),
            SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, logit_bias={x: 1.0},
                           frequency_penalty=0.5, repetition_penalty=1.2, min_p=0.05))]
        assert all(r.result(timeout=120).completion_tokens == 8 for r in reqs)
        assert e.stats()["failed_steps"] == 0
    finally:
        e.abort()


def test_n_choices_prefill_once(model, tok):
    """n = 4 choices of one prompt (what the server submits: seeds s..s+3): the prompt is
    prefilled once and its KV rows copied into the other slots; the outputs are those of
    four independent requests with the same seeds."""
    prompt = TEXT[:30]
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=100 + j)
              for j in range(4)]
    e = Engine(model, tok, max_slots=8).start()
    try:
        alone, costs = [], []
        for p in params:  # independently, one at a time
            before = e.stats()
            alone.append(e.generate(prompt, SamplingParams(**p.__dict__), timeout=60).token_ids)
            costs.append(e.stats()["prefill_tokens"] - before["prefill_tokens"])
        assert costs == [len(prompt)] * 4
        before = e.stats()
        with e._cv:  # one request's n choices arrive together
            reqs = [e.submit(prompt, SamplingParams(**p.__dict__), loop=False) for p in params]
        outs = [r.result(timeout=60).token_ids for r in reqs]
        after = e.stats()
        assert outs == alone
        assert len(set(map(tuple, outs))) > 1  # the seeds differ
        assert after["prefill_tokens"] - before["prefill_tokens"] == len(prompt)  # as n = 1
        assert after["prefills"] - before["prefills"] == 1
        assert after["prefix_copies"] - before["prefix_copies"] == 3
        for _ in range(200):  # the last event comes before the step's reap
            if e.idle:
                break
            threading.Event().wait(0.01)
        assert e.idle and len(e.scheduler.free_slots) == 8
    finally:
        e.abort()


def test_shared_prompt_source_cancelled_or_decoding(model, tok):
    """The request whose prefill others wait on is cancelled mid-prefill: the next one
    prefills for the rest. A prompt that another request is already decoding: copied but
    for its last token (one prefilled token)."""
    long = TEXT[:45]
    ref = reference(model, tok, long, 6)
    e = Engine(model, tok, max_slots=4, step_tokens=8, min_prefill_tokens=4,
               step_delay_s=0.02).start()  # 45 prompt tokens: 6 steps of prefill
    try:
        with e._cv:
            reqs = [e.submit(long, SamplingParams(max_tokens=6, temperature=0), loop=False)
                    for _ in range(3)]
        while e.stats()["active"] < 3:  # admitted: reqs[0] prefills, the others follow it
            threading.Event().wait(0.001)
        reqs[0].cancel()
        assert [r.result(timeout=60).token_ids for r in reqs[1:]] == [ref, ref]
        assert [ev.finish_reason for ev in reqs[0].events(timeout=5)][-1] == "cancelled"
        st = e.stats()
        assert st["prefix_copies"] == 1 and st["prefill_tokens"] > len(long)  # 1 restarted
        # a stream decoding the prompt; the same prompt again costs one prefill token
        busy = e.submit(long, SamplingParams(max_tokens=15, temperature=0), loop=False)
        next(busy.events(timeout=30))
        before = e.stats()
        again = e.generate(long, SamplingParams(max_tokens=6, temperature=0), timeout=60)
        assert again.token_ids == ref
        assert e.stats()["prefill_tokens"] - before["prefill_tokens"] == 1
        busy.cancel()
    finally:
        e.abort()


def test_echo_only_requests_free_their_slot(model, tok):
    """max_tokens 0 with echo (scoring a prompt, as lm-eval's loglikelihood does) used to
    keep its slot: with one slot the second such request never ran."""
    e = Engine(model, tok, max_slots=1).start()
    try:
        for _ in range(3):
            c = e.generate("First", SamplingParams(max_tokens=0, echo=True, logprobs=0), timeout=30)
            assert c.completion_tokens == 0 and len(c.prompt_logprobs) == 5
    finally:
        e.abort()


def test_kv_budget_arithmetic():
    from raygpt.serving.kvbudget import KVBudgetError, kv_bytes_per_slot, plan_slots
    from raygpt.serving.settings import ServerSettings

    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=128, vocab_size=100)
    # layers x 2 (k, v) x heads x head_dim x block_size x dtype size
    assert kv_bytes_per_slot(cfg, torch.float32) == 3 * 2 * 4 * 16 * 128 * 4
    assert kv_bytes_per_slot(cfg, torch.bfloat16) == 3 * 2 * 4 * 16 * 128 * 2
    from raygpt.model.gpt import KVCache

    c = KVCache(cfg, 5, dtype=torch.bfloat16)
    assert sum(k.nbytes + v.nbytes for k, v in c.layers) == 5 * kv_bytes_per_slot(cfg, torch.bfloat16)
    per = 1000
    assert plan_slots(per, 32, 10_500) == 10          # the budget binds
    assert plan_slots(per, 4, 10_500) == 4            # max_slots binds
    assert plan_slots(per, 32, 10_500, held=7_000) == 3  # beside another model's cache
    with pytest.raises(KVBudgetError) as ei:
        plan_slots(per, 32, 999, what="kv_memory_bytes=999")
    assert not ei.value.fits_alone
    with pytest.raises(KVBudgetError) as ei:
        plan_slots(per, 32, 10_500, held=10_000)
    assert ei.value.fits_alone
    s = ServerSettings.from_args({})
    assert s.kv_memory_fraction == 0.5 and s.kv_memory_bytes is None
    from raygpt.errors import UserError

    for bad in ({"kv_memory_fraction": 0}, {"kv_memory_fraction": 1.5}, {"kv_memory_bytes": 0}):
        with pytest.raises(UserError):
            ServerSettings.from_args(bad)


def test_kv_budget_derives_slots_and_refuses_a_swap_that_does_not_fit(model, tok):
    """Slots come from the budget; a second model beside one still serving gets what is
    left, or a one-line refusal naming the budget; a drained engine frees its cache and
    gives its bytes back, so the same model then fits."""
    from raygpt.serving.kvbudget import LEDGER, KVBudgetError, kv_bytes_per_slot

    per = kv_bytes_per_slot(model.config, torch.float32)
    base = LEDGER.held("cpu")  # engines of other tests still alive in this process
    budget = base + 4 * per + per // 2
    old = Engine(model, tok, max_slots=8, kv_memory_bytes=budget).start()
    assert old.max_slots == 4 and old.stats()["max_slots"] == 4
    assert sum(k.nbytes + v.nbytes for k, v in old.cache.layers) == 4 * per
    assert old.stats()["kv_cache_bytes"] == 4 * per and old.stats()["kv_budget_bytes"] == budget
    with pytest.raises(KVBudgetError) as ei:
        Engine(model, tok, max_slots=8, kv_memory_bytes=budget, version="v2")
    msg = str(ei.value)
    assert "\n" not in msg and f"kv_memory_bytes={budget}" in msg and "'v2'" in msg
    assert "held by another model" in msg and ei.value.fits_alone
    assert LEDGER.held("cpu") == base + 4 * per  # the refused engine booked nothing
    reqs = [old.submit("hear", SamplingParams(max_tokens=10, temperature=0), loop=False)
            for _ in range(6)]
    assert all(r.result(timeout=60).completion_tokens == 10 for r in reqs)
    assert old.stats()["max_batch"] <= 4
    old.close()  # drains, then frees the cache
    assert old.cache is None and LEDGER.held("cpu") == base
    new = Engine(model, tok, max_slots=8, kv_memory_bytes=budget, version="v2")
    try:
        assert new.max_slots == 4
        assert new.generate("hear", SamplingParams(max_tokens=5, temperature=0), timeout=60
                            ).token_ids == reference(model, tok, "hear", 5)
        # beside it, a model that fits in what is left gets that many slots
        small = Engine(model, tok, max_slots=8, kv_memory_bytes=budget + 2 * per)
        assert small.max_slots == 2
        small.abort()
        assert LEDGER.held("cpu") == base + 4 * per
        with pytest.raises(KVBudgetError, match="needs .* for one slot"):
            Engine(model, tok, kv_memory_bytes=per - 1)
    finally:
        new.abort()
    assert LEDGER.held("cpu") == base


def test_sampler_flags_an_invalid_row_without_failing_the_batch():
    """A row whose distribution is not one (all -inf: nan after softmax) ends alone, with
    the check made on the device and read with the tokens (torch.multinomial would read
    it back on its own, a sync per call on a GPU); the draw equals torch.multinomial's."""
    from raygpt.serving.request import Request
    from raygpt.serving.sampler import Sampler, draw

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50) * 3
    probs = torch.softmax(logits, -1)
    toks, ok = draw(logits, 1.0, generator=g1)
    assert toks.tolist() == torch.multinomial(probs, 1, generator=g2).squeeze(-1).tolist()
    assert ok.all()
    reqs = [Request([1, 2], SamplingParams(temperature=1.0)) for _ in range(3)]
    raw = torch.randn(3, 50)
    raw[1] = float("-inf")
    failed = []
    toks, lps = Sampler(None).step(raw, reqs, lambda rs, e: failed.extend(rs))
    assert toks[1] is None and toks[0] is not None and toks[2] is not None
    assert failed == [reqs[1]]


def test_the_server_settings_budget_reaches_the_engine(tmp_path):
    """adapter.load_engine passes kv_memory_bytes on: a budget of 3 slots gives 3 slots
    whatever max_slots says (before, the settings were read and dropped: 0.5 of RAM)."""
    import torch

    from conftest import tiny_model_dir
    from raygpt.model.io import load_model_dir
    from raygpt.serving.adapter import load_engine
    from raygpt.serving.kvbudget import kv_bytes_per_slot
    from raygpt.serving.settings import ServerSettings

    d = tiny_model_dir(tmp_path, "abcdefgh ijk\n" * 4)
    per = kv_bytes_per_slot(load_model_dir(d)[0].config, torch.float32)
    eng = load_engine(str(d), ServerSettings(model_dir=str(d), max_slots=16, kv_memory_bytes=3 * per), "m")
    try:
        assert eng.max_slots == 3
    finally:
        eng.abort()


def test_a_model_swap_beyond_the_kv_budget_is_refused_and_the_old_model_serves(tmp_path):
    """The swap path Serve takes on a new user_config (ModelManager.reconfigure): the
    serving model fills the KV budget, so the new one is refused, in one line naming the
    budget and saying it fits alone (what GET /admin/model shows), and the old model keeps
    serving."""
    import torch

    from conftest import tiny_model_dir
    from raygpt.model.io import load_model_dir
    from raygpt.serving.kvbudget import kv_bytes_per_slot
    from raygpt.serving.models import ModelManager
    from raygpt.serving.settings import ServerSettings

    a = str(tiny_model_dir(tmp_path / "a", "abcdefgh ijk\n" * 4))
    b = str(tiny_model_dir(tmp_path / "b", "lmnop qrs\n" * 4))
    per = kv_bytes_per_slot(load_model_dir(a)[0].config, torch.float32)
    mgr = ModelManager(ServerSettings(model_dir=a, max_slots=2, kv_memory_bytes=2 * per), None, "t")
    asyncio.run(mgr.reconfigure({"model_dir": a}))
    old = mgr.engine
    try:
        asyncio.run(mgr.reconfigure({"model_dir": b}))
        err = mgr.card(admin=True)["last_update_error"]
        assert err["model_dir"] == b and "\n" not in err["error"]
        assert f"kv_memory_bytes={2 * per}" in err["error"] and "held by another model" in err["error"]
        assert "fits once the model serving now is gone" in err["error"]
        assert mgr.engine is old and mgr.card(admin=True)["model_dir"] == a
        assert old.generate("abc", SamplingParams(max_tokens=4, temperature=0), timeout=60
                            ).completion_tokens == 4
    finally:
        old.abort()


def test_decoding_rows_stay_in_consecutive_slots(model, tok):
    """Four requests decode side by side and end one by one, the first to end in the
    lowest slot: the rows above move down into the freed slots, so no decode step has to
    gather the rows' keys and values from scattered slots, and every output is still the
    model's greedy continuation."""
    e = Engine(model, tok, max_slots=4).start()
    try:
        jobs = [("First", 6), ("hear me", 30), ("A", 12), ("Speak, speak.", 24)]
        reqs = [e.submit(p, SamplingParams(max_tokens=n, temperature=0), loop=False) for p, n in jobs]
        for (p, n), r in zip(jobs, reqs):
            assert r.result(timeout=60).token_ids == reference(model, tok, p, n), p
        st = e.stats()
        assert st["slot_moves"] >= 2 and st["decode_gathers"] == 0, st
    finally:
        e.abort()


def test_a_sampled_batch_wakes_its_event_loop_once(model, tok):
    """Eight streams of one event loop decoding together: each sampled batch's events
    reach the loop in one call_soon_threadsafe (a wake-up of the loop), not one per token."""
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda cb, *a, **k: (wakeups.append(cb), real(cb, *a, **k))[1]
        e = Engine(model, tok, max_slots=8).start()
        try:
            reqs = [e.submit("hear", SamplingParams(max_tokens=10, temperature=0)) for _ in range(8)]
            res = await asyncio.gather(*(r.aresult() for r in reqs))
            return res, wakeups, e.stats()
        finally:
            e.abort()

    res, wakeups, st = asyncio.run(main())
    assert [c.completion_tokens for c in res] == [10] * 8
    batches = st["decode_steps"] + st["prefill_batches"]
    assert len(wakeups) <= batches < 80, (len(wakeups), st)
