"""Prometheus metrics under vLLM's names with a `qwenlm:` prefix, so vLLM dashboards work unchanged.

Latencies and token counts are measured by the server per request; queue, KV-cache and prefix-cache
figures are read from `engine.stats()` at scrape time. Each app has its own registry.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

disable_created_metrics()  # no *_created series: vLLM exposes none and they double the output


class _EngineStatsCollector:
    """Gauges read from engine.stats() when /metrics is scraped."""

    _GAUGES = [  # (metric name, stats key, help)
        ("qwenlm:num_requests_running", "num_running", "Requests in the running batch."),
        ("qwenlm:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
        ("qwenlm:kv_cache_usage_perc", "kv_usage", "Fraction of KV-cache blocks in use (1 = full)."),
        ("qwenlm:prefix_cache_hit_rate", "prefix_cache_hit_rate", "Fraction of prompt tokens served from the "
                                                                   "prefix cache."),
    ]

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        stats = self.engine.stats()
        for name, key, doc in self._GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield g


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("qwenlm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("qwenlm:inter_token_latency_seconds", "Time between output tokens.", labels,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("qwenlm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_len = Histogram("qwenlm:request_prompt_tokens", "Prompt tokens per request.", labels,
                                    buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        self.gen_len = Histogram("qwenlm:request_generation_tokens", "Generated tokens per request.", labels,
                                 buckets=TOKEN_BUCKETS, registry=r).labels(model_name)
        # prometheus_client appends _total to counters: these are exposed as qwenlm:prompt_tokens_total etc.
        self.prompt_tokens = Counter("qwenlm:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("qwenlm:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.success = Counter("qwenlm:request_success", "Requests finished, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.model_name = model_name
        r.register(_EngineStatsCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per engine request: TTFT, inter-token latency, end-to-end latency and token counters."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.generated = 0
        self.first = True
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.prompt_len.observe(prompt_tokens)

    def tokens(self, total_generated: int) -> None:
        """Called with the running total of generated tokens (all n samples) after each engine step."""
        new = total_generated - self.generated
        if new <= 0:
            return
        t = time.perf_counter()
        if self.first:
            self.m.ttft.observe(t - self.start)
            self.first = False
        else:
            self.m.itl.observe((t - self.last) / new)
        self.last = t
        self.generated = total_generated
        self.m.generation_tokens.inc(new)

    def done(self, finish_reasons: list[str]) -> None:
        self.m.e2e.observe(time.perf_counter() - self.start)
        self.m.gen_len.observe(self.generated)
        for reason in finish_reasons:
            self.m.success.labels(self.m.model_name, reason).inc()
