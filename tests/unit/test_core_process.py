"""The engine core in its own process (serve arg engine_process): a real child process
running the real Engine, no Ray. It must answer exactly as the in-process engine does,
free a cancelled request's slot, and end every request when the child dies."""
from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch

from conftest import tiny_model_dir
from raygpt.errors import UserError
from raygpt.model.gpt import GPTConfig
from raygpt.model.io import read_model_config
from raygpt.serving import adapter
from raygpt.serving.core_process import ProcessEngine, _Held
from raygpt.serving.kvbudget import KVBudgetError, kv_bytes_per_slot
from raygpt.serving.engine import EngineClosed, EngineError, SamplingParams
from raygpt.serving.settings import ServerSettings

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("core"), TEXT))


@pytest.fixture(scope="module")
def engines(model_dir):
    s = ServerSettings(model_dir=model_dir, max_slots=4, max_waiting=8, num_threads=1)
    pe = ProcessEngine(model_dir, s, "proc")
    ref = adapter.load_engine(model_dir, s, "ref")
    yield pe, ref
    pe.abort()
    ref.abort()


def _until(cond, what, timeout=30.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        ev.wait(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_answers_equal_the_in_process_engine(engines):
    pe, ref = engines
    assert pe._proc.pid != os.getpid() and pe._proc.poll() is None
    for params in (SamplingParams(max_tokens=30, temperature=0),
                   SamplingParams(max_tokens=30, temperature=0.9, seed=7, top_k=5),
                   SamplingParams(max_tokens=12, temperature=0, logprobs=2),
                   SamplingParams(max_tokens=5, temperature=0, logprobs=1, echo=True)):
        a, b = pe.generate("First", params, timeout=60), ref.generate("First", params, timeout=60)
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
        assert (a.logprobs, a.prompt_logprobs) == (b.logprobs, b.prompt_logprobs)


def test_concurrent_streams_and_a_cancel_that_frees_its_slot(engines):
    pe, ref = engines

    async def main():
        rs = [pe.submit("hear", SamplingParams(max_tokens=20, temperature=0.8, seed=i)) for i in range(6)]
        texts = [(await r.aresult()).text for r in rs]
        long = pe.submit("Speak", SamplingParams(max_tokens=60, temperature=0))
        async for ev in long.aevents():
            long.cancel()
            last = ev
        return texts, last

    texts, last = asyncio.run(main())
    want = [ref.generate("hear", SamplingParams(max_tokens=20, temperature=0.8, seed=i)).text for i in range(6)]
    assert texts == want  # 6 rows on 4 slots: seeded rows do not depend on their batch
    assert last.finish_reason in ("cancelled", "length")
    _until(lambda: pe.stats()["active"] == 0 and pe.idle, "the cancelled request's slot freed")
    st = pe.stats()
    assert st["requests_finished"] >= 7 and st["max_slots"] == 4


def test_a_bad_model_dir_is_one_line_and_no_process_left(tmp_path):
    s = ServerSettings(model_dir=str(tmp_path), num_threads=1)
    with pytest.raises(UserError, match=str(tmp_path)):
        ProcessEngine(str(tmp_path), s, "bad")


def test_a_dead_engine_process_ends_its_requests(model_dir):
    pe = ProcessEngine(model_dir, ServerSettings(model_dir=model_dir, max_slots=2, step_delay_s=0.05,
                                                 num_threads=1), "doomed")
    r = pe.submit("First", SamplingParams(max_tokens=60, temperature=0), loop=False)
    next(r.events(timeout=30))  # it is decoding
    os.kill(pe._proc.pid, signal.SIGKILL)
    assert [ev.finish_reason for ev in r.events(timeout=30)][-1] == "cancelled"
    _until(lambda: not pe._thread.is_alive(), "the reader thread ended (check_health sees it)")
    with pytest.raises(EngineClosed):
        pe.submit("First", SamplingParams(max_tokens=1))
    assert pe._proc.wait(5) == -signal.SIGKILL


def test_fault_file_fails_the_steps_in_the_child(model_dir, tmp_path):
    """settings.fault_file (a broken device, for tests) reaches the engine in the child:
    its failed steps show in the health check's counter."""
    flag = tmp_path / "fault"
    pe = ProcessEngine(model_dir, ServerSettings(model_dir=model_dir, max_slots=2, num_threads=1,
                                                 fault_file=str(flag)), "faulty")
    try:
        assert pe.generate("First", SamplingParams(max_tokens=3, temperature=0), timeout=30).text
        flag.write_text("*")
        with pytest.raises(EngineError, match="injected device failure"):
            pe.generate("First", SamplingParams(max_tokens=3, temperature=0), timeout=30)
        assert pe.consecutive_failed_steps >= 1
    finally:
        pe.abort()


def test_a_second_engine_beyond_the_kv_budget_is_refused_while_the_first_holds_it(model_dir):
    """As in one process (kvbudget.LEDGER): a new engine process gets the budget the live
    ones leave; not one slot left -> KVBudgetError, which says it would fit alone."""
    slot = kv_bytes_per_slot(GPTConfig(**read_model_config(model_dir)["model"]), torch.float32)
    held = _Held.on("cpu")  # the module's other engine processes, still alive
    s = ServerSettings(model_dir=model_dir, max_slots=3, kv_memory_bytes=held + 3 * slot, num_threads=1)
    first = ProcessEngine(model_dir, s, "first")
    try:
        assert first.max_slots == 3
        with pytest.raises(KVBudgetError) as e:
            ProcessEngine(model_dir, s, "second")
        assert e.value.fits_alone
    finally:
        first.abort()
    again = ProcessEngine(model_dir, s, "again")  # the first gave its bytes back
    assert again.max_slots == 3
    again.abort()
