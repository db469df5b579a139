# Prometheus metrics with vLLM's names under a `pipeloom:` prefix: engine gauges, token counters, latency histograms.
"""Scraped at ``GET /metrics`` (text format 0.0.4). One registry per server (several servers in one process,
as in tests, never collide). Engine state (running / waiting requests, KV usage, preemptions, prefix-cache
queries and hits) is read at scrape time; per-request latencies are observed by the server as tokens stream:

- ``pipeloom:time_to_first_token_seconds``: admission to the first output token;
- ``pipeloom:inter_token_latency_seconds``: gaps between a request's consecutive outputs;
- ``pipeloom:e2e_request_latency_seconds``: admission to the end;
- ``pipeloom:request_queue_time_seconds``: arrival in the engine to its first scheduling.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Reads the engine at scrape time (the engine never imports the server; the server reads the engine)."""

    def __init__(self, engine, model_name: str):
        self.engine, self.labels = engine, [model_name]

    def collect(self):
        e, label = self.engine, ["model_name"]
        sched, bm = e.scheduler, e.block_manager
        for name, doc, value in (
            ("num_requests_running", "Sequences in the running batch.", len(sched.running)),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", len(sched.waiting)),
            ("kv_cache_usage_perc", "KV-cache usage (0..1): share of blocks held by requests.", bm.usage()),
        ):
            g = GaugeMetricFamily(f"pipeloom:{name}", doc, labels=label)
            g.add_metric(self.labels, value)
            yield g
        for name, doc, value in (
            ("num_preemptions", "Preemptions (by recompute) in the engine.", e.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", bm.queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", bm.hits),
            ("iterations", "Engine iterations run.", len(e.records)),
        ):
            c = CounterMetricFamily(f"pipeloom:{name}", doc, labels=label)
            c.add_metric(self.labels, value)
            yield c


class Metrics:
    """The server's registry and the observations every protocol makes through :class:`RequestTimer`."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, label = self.registry, ["model_name"]
        self.prompt_tokens = Counter("pipeloom:prompt_tokens", "Prompt tokens of finished requests.", label,
                                     registry=reg)
        self.generation_tokens = Counter("pipeloom:generation_tokens", "Generated tokens.", label, registry=reg)
        self.request_success = Counter("pipeloom:request_success", "Finished sequences (samples) by finish reason.",
                                       label + ["finished_reason"], registry=reg)
        self.rejected = Counter("pipeloom:num_requests_rejected", "Requests refused by admission control (429).",
                                label, registry=reg)
        self.aborted = Counter("pipeloom:num_requests_aborted", "Requests aborted (client gone or cancelled).",
                               label, registry=reg)
        self.ttft = Histogram("pipeloom:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("pipeloom:inter_token_latency_seconds", "Time between consecutive outputs.", label,
                             buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("pipeloom:e2e_request_latency_seconds", "Request latency, admission to end.", label,
                             buckets=E2E_BUCKETS, registry=reg)
        self.queue = Histogram("pipeloom:request_queue_time_seconds", "Time waiting before first scheduled.", label,
                               buckets=E2E_BUCKETS, registry=reg)
        reg.register(_EngineCollector(engine, model_name))

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One request's clock: call :meth:`output` per engine output, :meth:`finish` once at the end."""

    def __init__(self, metrics: Metrics):
        self.m, self.name = metrics, metrics.model_name
        self.start = time.perf_counter()
        self.last: float | None = None
        self.queue_seen = False

    def output(self, new_tokens: int, queue_time: float | None = None) -> None:
        now = time.perf_counter()
        if queue_time is not None and not self.queue_seen:
            self.queue_seen = True
            self.m.queue.labels(self.name).observe(max(0.0, queue_time))
        if new_tokens:
            (self.m.ttft if self.last is None else self.m.itl).labels(self.name).observe(
                now - (self.start if self.last is None else self.last))
            self.last = now
            self.m.generation_tokens.labels(self.name).inc(new_tokens)

    def finish(self, reasons: list[str], prompt_tokens: int) -> None:
        self.m.e2e.labels(self.name).observe(time.perf_counter() - self.start)
        self.m.prompt_tokens.labels(self.name).inc(prompt_tokens)
        for reason in reasons:
            if reason == "abort":
                self.m.aborted.labels(self.name).inc()
            else:
                self.m.request_success.labels(self.name, reason).inc()
