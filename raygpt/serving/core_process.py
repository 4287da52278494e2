"""The engine core in its own process (serve arg `engine_process`), like vLLM V1's
EngineCore beside its API server.

Why: in one process the engine thread gives the GIL up in every torch op and must win it
back from the replica's event loops (HTTP, SSE, Serve's message path), which hold it for
each token they stream. Measured on 2 cores at 32 streams over HTTP: the engine thread ran
64% of the time and spent ~1.5 ms of CPU a token against ~0.85 ms alone
(docs/serving.md, "Benchmark"). In its own process it has a GIL of its own.

Parent: `ProcessEngine`, the facade the server uses in place of an `Engine` (submit,
stats, close, abort, idle, ...). Its requests are ordinary `Request`s of the parent; their
events come from the child, one pipe message per sampled batch, and go to the event
loops as `request.deliver` sends an in-process engine's.
Child: `_core_main` loads the model dir into an `Engine` (adapter.load_engine) and
serves commands from the pipe. Its requests deliver through `_PipeSink`, which stands in
for an event loop.
"""
from __future__ import annotations

import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from raygpt.errors import UserError
from raygpt.serving import kvbudget
from raygpt.serving.request import (
    EngineClosed,
    EngineOverloaded,
    Event,
    Observer,
    Request,
    SamplingParams,
    deliver,
)
from raygpt.serving.settings import ServerSettings

log = logging.getLogger("raygpt.serving.core_process")

START_TIMEOUT_S = 600.0  # spawn, import torch, load and warm up the model
STATS_TIMEOUT_S = 10.0


class CoreProcessError(RuntimeError):
    """The engine core process failed to start or died."""


# --------------------------------------------------------------------- child


class _PipeSink:
    """The child's stand-in for an event loop. `request.deliver` calls
    call_soon_threadsafe(_put_all, [(request, event), ...]) once per sampled batch, and a
    request's own events come as call_soon_threadsafe(its_queue.put_nowait, event) (the
    queue knows its request: `.req`). Both become one pipe message of
    (request id, event, prompt logprobs on the first event of an echo) triples."""

    def __init__(self, conn, lock: threading.Lock, live: dict):
        self.conn, self.lock, self.live = conn, lock, live

    def call_soon_threadsafe(self, fn, arg) -> None:
        with self.lock:  # also waits out a submit in progress (its rid is set under it)
            pairs = arg if isinstance(arg, list) else [(fn.__self__.req, arg)]
            out = []
            for r, ev in pairs:
                # prompt logprobs (echo) exist once the prompt is prefilled: with the first event
                extra = None
                if r.prompt_logprobs is not None and not getattr(r, "sent_prompt", False):
                    r.sent_prompt, extra = True, r.prompt_logprobs
                if ev.finish_reason is not None:
                    self.live.pop(r.rid, None)
                out.append((r.rid, ev, extra))
            self.conn.send(("events", out))


def _fault_hook(path: str, me: str | None):
    def hook():
        try:
            who = Path(path).read_text().split()
        except OSError:
            return
        if "*" in who or (me is not None and me in who):
            raise RuntimeError(f"injected device failure ({path})")
    return hook


def _child_entry() -> None:
    """`python -c ...` in the child: its end of the pipe is fd argv[1]; the first message
    says what to load."""
    conn = Connection(int(sys.argv[1]))
    _core_main(conn, *conn.recv())


def _core_main(conn, model_dir: str, settings: dict, name: str, replica: str | None) -> None:
    from raygpt.serving import adapter

    s = ServerSettings.model_validate(settings)
    if s.num_threads:
        import torch

        torch.set_num_threads(s.num_threads)
    try:
        eng = adapter.load_engine(model_dir, s, name)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", type(e).__name__, str(e), isinstance(e, UserError)))
        return
    if s.fault_file:
        eng.fault_hook = _fault_hook(s.fault_file, replica)
    conn.send(("ready", {"version": eng.version, "meta": eng.meta, "cfg": eng.cfg,
                         "block_size": eng.block_size, "max_slots": eng.max_slots,
                         "max_waiting": eng.max_waiting, "kv_bytes_per_slot": eng.kv_bytes_per_slot,
                         "device": str(eng.device)}))
    lock, live = threading.Lock(), {}
    sink = _PipeSink(conn, lock, live)
    try:
        _serve_commands(conn, eng, sink, lock, live)
    finally:
        try:
            with lock:
                conn.send(("closed", eng.stats()))
        except OSError:  # the parent is gone
            pass


def _serve_commands(conn, eng, sink: _PipeSink, lock: threading.Lock, live: dict) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody to answer
            eng.abort()
            return
        op = msg[0]
        if op == "submit":
            _, rid, ids, params = msg
            with lock:
                try:
                    r = eng.submit(ids, params, loop=sink)
                except Exception as e:  # noqa: BLE001 - closing or full: the request ends here
                    conn.send(("events", [(rid, Event(finish_reason="error", error=str(e)), None)]))
                    continue
                r.rid, r._aq.req = rid, r
                live[rid] = r
        elif op == "cancel":
            with lock:
                r = live.get(msg[1])
            if r is not None:
                r.cancel()
        elif op == "stats":
            st = eng.stats()
            with lock:
                conn.send(("stats", msg[1], st))
        elif op == "close":
            eng.close(wait=True)
            return
        elif op == "abort":
            eng.abort()
            return


# --------------------------------------------------------------------- parent


class _Held:
    """KV bytes the live engine processes of this replica hold, per device: a new one's
    budget is what they leave (in one process, kvbudget.LEDGER does this)."""

    lock = threading.Lock()
    by_engine: dict[int, tuple[str, int]] = {}

    @classmethod
    def on(cls, device: str) -> int:
        with cls.lock:
            return sum(b for d, b in cls.by_engine.values() if d == device)


class ProcessEngine:
    """An `Engine` run in a child process; the parts of Engine's interface the server
    uses. `max_waiting` is enforced here on the requests in flight (slots + queue)."""

    def __init__(self, model_dir: str, s: ServerSettings, name: str = "engine",
                 observer: Observer | None = None, replica: str | None = None):
        from raygpt.data.tokenizer import load_tokenizer
        from raygpt.model.chat import ChatTemplate
        from raygpt.model.io import TOKENIZER

        self.name, self.observer = name, observer or Observer()
        self.model_dir = str(model_dir)
        settings = s.model_dump()
        device = _device(s.device)
        # the budget less what this replica's other engine processes hold
        held = _Held.on(device)
        budget = s.kv_memory_bytes or kvbudget.resolve_budget(_torch_device(device), s.kv_memory_fraction)[0]
        settings["kv_memory_bytes"] = max(1, budget - held)
        # A fresh interpreter, not multiprocessing: a fork would copy the replica's threads
        # and locks, and spawn re-imports the main module (Ray's worker script).
        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from raygpt.serving.core_process import _child_entry; _child_entry()",
             str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        theirs.close()
        self._conn = Connection(mine.detach())
        self._conn.send((self.model_dir, settings, name, replica))
        info = self._wait_ready(held)
        self.version, self.meta, self.cfg = info["version"], info["meta"], info["cfg"]
        self.block_size, self.max_slots = info["block_size"], info["max_slots"]
        self.max_waiting, self.kv_bytes_per_slot = info["max_waiting"], info["kv_bytes_per_slot"]
        self.device = info["device"]
        with _Held.lock:
            _Held.by_engine[id(self)] = (device, self.max_slots * self.kv_bytes_per_slot)
        self.tokenizer = load_tokenizer(Path(model_dir) / TOKENIZER)
        self.chat_template = ChatTemplate.load(model_dir, s.chat_template)
        self.loaded_at = int(time.time())
        self._closing = False
        self._send_lock = threading.Lock()
        self._reqs: dict[int, Request] = {}
        self._rids = itertools.count()
        self._stats: dict[str, Any] = {}
        self._replies: dict[int, threading.Event] = {}
        self._thread = threading.Thread(target=self._read, name=f"raygpt-{name}-reader", daemon=True)
        self._thread.start()

    def _wait_ready(self, held: int) -> dict:
        if not self._conn.poll(START_TIMEOUT_S):
            self._kill()
            raise CoreProcessError(f"the engine process for {self.model_dir} did not start within "
                                   f"{START_TIMEOUT_S:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            raise CoreProcessError(f"the engine process for {self.model_dir} exited while loading "
                                   f"(exit code {self._reap(5)})") from None
        if msg[0] == "error":
            _, kind, text, user = msg
            self._reap(5)
            if kind == "KVBudgetError":  # its budget was what the other engines left (fits_alone)
                raise kvbudget.KVBudgetError(text, fits_alone=held > 0)
            raise (UserError(text) if user else CoreProcessError(f"{kind}: {text}"))
        return msg[1]

    # ------------------------------------------------------------ the Engine interface

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def idle(self) -> bool:
        return not self._reqs

    @property
    def consecutive_failed_steps(self) -> int:  # the health check's: asked of the child
        return self.stats().get("consecutive_failed_steps", 0)

    def outbox(self):
        return None  # events reach this process already batched

    def encode(self, prompt) -> list[int]:
        from raygpt.serving.engine import encode_prompt

        return encode_prompt(self.tokenizer, self.cfg.vocab_size, self.block_size, prompt)

    def submit(self, prompt, params: SamplingParams | None = None, loop=None) -> Request:
        from raygpt.serving.engine import checked_submission

        params, ids, loop = checked_submission(self.encode, self.cfg.vocab_size, prompt, params, loop)
        if self._closing:
            raise EngineClosed(f"engine {self.name} is not accepting requests")
        if len(self._reqs) >= self.max_slots + self.max_waiting:
            raise EngineOverloaded(f"{len(self._reqs) - self.max_slots} requests are already "
                                   "waiting for a slot")
        req = Request(ids, params, loop, engine=self)
        req.rid = next(self._rids)
        self._reqs[req.rid] = req
        self._send(("submit", req.rid, ids, params))
        return req

    def generate(self, prompt, params: SamplingParams | None = None, timeout: float | None = None):
        return self.submit(prompt, params, loop=False).result(timeout)

    def _drop_waiting(self, r: Request) -> None:  # Request.cancel: the child cancels its twin
        self._send(("cancel", r.rid))

    def stats(self) -> dict[str, Any]:
        if self._thread.is_alive():
            token = next(self._rids)
            ev = self._replies[token] = threading.Event()
            if self._send(("stats", token)):
                ev.wait(STATS_TIMEOUT_S)
            self._replies.pop(token, None)
        st = dict(self._stats)
        st.setdefault("version", self.version)
        st["closing"] = self._closing
        return st

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        self._closing = True
        self._send(("close",))
        if wait:
            self._thread.join(timeout)
            self._reap(5 if timeout is None else timeout)

    def abort(self) -> None:
        self._closing = True
        self._send(("abort",))
        self._thread.join(30)
        self._reap(5)

    def _reap(self, timeout: float) -> int | None:
        """Wait for the child to exit (killed after `timeout`). -> its exit code."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self._kill()

    def _kill(self) -> int | None:
        self._proc.kill()
        return self._proc.wait()

    # ------------------------------------------------------------ the pipe

    def _send(self, msg) -> bool:
        try:
            with self._send_lock:
                self._conn.send(msg)
            return True
        except (OSError, ValueError):  # the child is gone; the reader ends every request
            return False

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "events":
                    self._on_events(msg[1])
                elif msg[0] == "stats":
                    self._on_stats(msg[2])
                    ev = self._replies.get(msg[1])
                    if ev is not None:
                        ev.set()
                elif msg[0] == "closed":
                    self._on_stats(msg[1])
                    return
        except (EOFError, OSError):
            log.error("raygpt: the engine process of %s died (exit code %s)", self.model_dir,
                      self._proc.poll())
        finally:
            self._closing = True
            with _Held.lock:
                _Held.by_engine.pop(id(self), None)
            left = [(r, Event(finish_reason="cancelled")) for r in self._reqs.values()]
            self._reqs.clear()
            self._route(left)
            for ev in list(self._replies.values()):
                ev.set()

    def _on_stats(self, st: dict) -> None:
        self._stats = st

    def _on_events(self, pairs: list) -> None:
        now = time.perf_counter()
        out = []
        for rid, ev, prompt_logprobs in pairs:
            r = self._reqs.get(rid)
            if r is None:
                continue
            if prompt_logprobs is not None:
                r.prompt_logprobs = prompt_logprobs
            if r.logprobs is not None:
                r.logprobs.extend(ev.logprobs)
            if ev.token_ids:
                r.stamp(now, self.observer)
                r.generated.extend(ev.token_ids)
            if ev.finish_reason is not None:
                del self._reqs[rid]
                if ev.finish_reason not in ("error", "cancelled"):
                    self.observer.finished(ev.finish_reason, len(r.generated))
            out.append((r, ev))
        self._route(out)

    @staticmethod
    def _route(pairs: list) -> None:
        """To the requests' event loops (one wake-up per loop), or their sync queues."""
        looped = []
        for r, ev in pairs:
            if r._aq is not None:
                if ev.finish_reason is not None:
                    r.done = True
                looped.append((r, ev))
            else:
                r._put(ev)
        deliver(looped)


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _torch_device(device: str):
    import torch

    return torch.device(device)


def load_process_engine(model_dir: str, s: ServerSettings, name: str, observer=None,
                        replica: str | None = None) -> ProcessEngine:
    """adapter.load_engine's counterpart: a started, warmed-up engine in its own process."""
    return ProcessEngine(model_dir, s, name, observer, replica)
