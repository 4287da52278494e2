"""Serving metrics: recorded both through Ray's metrics (exported by Ray's metrics agent
with every other Ray metric, `ray_raygpt_*`) and in a per-replica Prometheus registry that
`GET /metrics` renders (`raygpt_*`; per replica: scrape each one or use Ray's export)."""
from __future__ import annotations

import threading
import time

from raygpt.serving.engine import Observer

TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]


class _Ray:
    """Ray's metrics; absent outside a Ray worker (unit use of the engine)."""

    def __init__(self, app: str):
        from ray.util import metrics as m

        self.tags = {"app": app}
        self.ttft = m.Histogram("raygpt_time_to_first_token_seconds", "time to first token",
                                TTFT_BUCKETS, tag_keys=("app",))
        self.itl = m.Histogram("raygpt_inter_token_latency_seconds", "time between tokens",
                               ITL_BUCKETS, tag_keys=("app",))
        self.tokens = m.Counter("raygpt_generated_tokens", "tokens generated", tag_keys=("app",))
        self.requests = m.Counter("raygpt_requests", "HTTP requests by status",
                                  tag_keys=("app", "status"))
        self.waiting = m.Gauge("raygpt_queue_depth", "requests waiting for a slot",
                               tag_keys=("app",))
        self.slots = m.Gauge("raygpt_slots_in_use", "KV-cache slots in use", tag_keys=("app",))
        for x in (self.ttft, self.itl, self.tokens, self.waiting, self.slots):
            x.set_default_tags(self.tags)
        # Each Ray metric call costs ~50 us in a worker (tag checks, a record under the
        # GIL): two per token on the engine thread were ~5% of a 32-row decode step. The
        # engine thread appends the latencies here; a daemon thread records them each second.
        self._ttft: list[float] = []
        self._itl: list[float] = []
        threading.Thread(target=self._flush_forever, name="raygpt-metrics", daemon=True).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(1.0)
            ttft, self._ttft = self._ttft, []  # swaps are atomic under the GIL
            itl, self._itl = self._itl, []
            try:
                for v in ttft:
                    self.ttft.observe(v)
                for v in itl:
                    self.itl.observe(v)
                if ttft or itl:
                    self.tokens.inc(len(ttft) + len(itl))
            except Exception:  # noqa: BLE001 - Ray shutting down: nothing to export to
                return


class ServerMetrics(Observer):
    def __init__(self, app: str = "raygpt", use_ray: bool = True):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("raygpt_time_to_first_token_seconds", "time to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("raygpt_inter_token_latency_seconds", "time between tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.tokens = Counter("raygpt_generated_tokens", "tokens generated", registry=r)
        self.requests = Counter("raygpt_requests", "HTTP requests by status", ["status"],
                                registry=r)
        self.finished_by = Counter("raygpt_finished_requests", "generations by finish reason",
                                   ["reason"], registry=r)
        self.waiting = Gauge("raygpt_queue_depth", "requests waiting for a slot", registry=r)
        self.slots = Gauge("raygpt_slots_in_use", "KV-cache slots in use", registry=r)
        self.ray = None
        if use_ray:
            try:
                self.ray = _Ray(app)
            except Exception:  # not in a Ray worker
                self.ray = None

    # engine thread
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.tokens.inc()
        if self.ray:
            self.ray._ttft.append(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.tokens.inc()
        if self.ray:
            self.ray._itl.append(seconds)

    def finished(self, reason: str, tokens: int) -> None:
        self.finished_by.labels(reason).inc()

    # event loop
    def request(self, status: int) -> None:
        self.requests.labels(str(status)).inc()
        if self.ray:
            self.ray.requests.inc(tags={**self.ray.tags, "status": str(status)})

    def engine_state(self, waiting: int, in_use: int) -> None:
        self.waiting.set(waiting)
        self.slots.set(in_use)
        if self.ray:
            self.ray.waiting.set(waiting)
            self.ray.slots.set(in_use)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
