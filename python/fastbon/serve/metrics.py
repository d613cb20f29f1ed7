"""Prometheus metrics: the engine's counters read at each scrape, and the server's own request latencies.

One registry per app (not prometheus_client's global one), so two servers in one process never share series."""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# engine.stats key -> (metric name, kind, help). Counters only grow; gauges are the engine's state now.
ENGINE_METRICS = {
    "rows_active": ("fastbon_rows_active", "gauge", "Sample rows decoding now (all requests)"),
    "requests_waiting": ("fastbon_requests_waiting", "gauge", "Requests queued, not yet admitted"),
    "requests_running": ("fastbon_requests_running", "gauge", "Requests admitted (prefilling or decoding)"),
    "kv_bytes": ("fastbon_kv_bytes", "gauge", "Bytes of KV cache held (prompt prefixes, sample suffixes, cache)"),
    "prefill_tokens": ("fastbon_prefill_tokens", "counter", "Prompt tokens run through prefill"),
    "prefix_cache_hit_tokens": ("fastbon_prefix_cache_hit_tokens", "counter",
                                "Prompt tokens served from the prefix cache instead of prefill"),
    "decode_steps": ("fastbon_decode_steps", "counter", "Decode steps (one forward over all active rows)"),
    "tokens_generated": ("fastbon_tokens_generated", "counter", "Tokens sampled, all rows"),
    "requests_finished": ("fastbon_requests_finished", "counter", "Requests completed"),
    "requests_cancelled": ("fastbon_requests_cancelled", "counter", "Requests cancelled (client gone, shutdown)"),
    "requests_failed": ("fastbon_requests_failed", "counter", "Requests that failed (each alone: never another)"),
    "preempted": ("fastbon_preemptions", "counter", "Rows preempted under the memory budget (decoded again later)"),
    "peak_kv_bytes": ("fastbon_peak_kv_bytes", "gauge", "The most bytes of KV cache held at once"),
    "prefix_cache_blocks": ("fastbon_prefix_cache_blocks", "gauge", "Prompt blocks kept for later requests"),
}

# Latency buckets from a few ms (a cached short completion) to minutes (long best-of-n on a CPU).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        for key, (name, kind, description) in ENGINE_METRICS.items():
            if key not in stats:
                continue
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, description)
            family.add_metric([], float(stats[key]))
            yield family


class Metrics:
    """The app's registry: engine counters plus HTTP requests by endpoint and status, end-to-end latency and
    time to first token (streams: the first chunk with text; otherwise the whole answer)."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.requests = Counter("fastbon_http_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("fastbon_request_latency_seconds", "Time from request to its last byte",
                                 ["endpoint"], buckets=_BUCKETS, registry=self.registry)
        self.first_token = Histogram("fastbon_time_to_first_token_seconds", "Time from request to its first "
                                     "generated text", ["endpoint"], buckets=_BUCKETS, registry=self.registry)
