"""Prometheus metrics of one server: engine gauges read at scrape time, latency histograms and
counters updated by the routes. Each app owns its registry (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector(Collector):
    """Reads the engine's counters (`LLMEngine.stats()`) when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, int] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator:
        s = self._stats()
        if s is None:  # the model is still loading
            return
        total = s["kv_blocks_free"] + s["kv_blocks_used"]
        for name, doc, value in (
            ("miaotui_num_requests_waiting", "Requests waiting to be scheduled.", s["waiting"]),
            ("miaotui_num_requests_running", "Requests in the running batch.", s["running"]),
            ("miaotui_kv_cache_usage_ratio", "Share of KV cache blocks in use (0-1).",
             s["kv_blocks_used"] / total if total else 0.0),
            ("miaotui_kv_cache_blocks_free", "Free KV cache blocks.", s["kv_blocks_free"]),
            ("miaotui_num_sequences_admitted", "Sequences the HTTP layer has admitted and not yet "
             "released (running + queued; 429 past the limit).", s.get("admitted", 0)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("miaotui_num_preemptions", "Requests preempted (to be recomputed).", s["preempted"]),
            ("miaotui_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
             s["prefix_cache_hit_tokens"]),
            ("miaotui_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
             s["prefix_cache_query_tokens"]),
            ("miaotui_prompt_tokens", "Prompt tokens processed.", s["prompt_tokens_total"]),
            ("miaotui_generation_tokens", "Tokens generated.", s["generation_tokens_total"]),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, int] | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.time_to_first_token = Histogram(
            "miaotui_time_to_first_token_seconds", "From request arrival to its first token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "miaotui_inter_token_latency_seconds", "Between consecutive output tokens of a request.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_latency = Histogram(
            "miaotui_e2e_request_latency_seconds", "From arrival to the last token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "miaotui_requests", "Admitted generation requests by how they ended: ok, error (in the "
            "response or the stream) or disconnected.", ["outcome"], registry=self.registry)
        self.http_requests = Counter(
            "miaotui_http_requests", "Every HTTP request by route and response status, rejections "
            "(401, 413, 429, ...) included; route is the path template, or 'unmatched'.",
            ["route", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
