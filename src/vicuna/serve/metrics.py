"""Prometheus metrics for the API front end, workers and engines.

Each app gets its own registry (several servers can live in one process, as in
tests). Engine gauges are read at scrape time from ``engine.stats()`` so the
engine itself stays free of any metrics library.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EngineCollector:
    """Queue length, running requests, tokens/s and totals of every engine, read when scraped."""

    def __init__(self, engines: Callable[[], dict[str, Any]]):
        self.engines = engines

    def collect(self):
        gauges = {
            "waiting": GaugeMetricFamily("vicuna_queue_length", "Requests waiting for a batch slot", labels=["model"]),
            "running": GaugeMetricFamily("vicuna_running_requests", "Requests being decoded", labels=["model"]),
            "tokens_per_second": GaugeMetricFamily(
                "vicuna_generation_tokens_per_second", "Generated tokens per second over the last 10 s",
                labels=["model"]),
            "kv_blocks_free": GaugeMetricFamily("vicuna_kv_cache_free_blocks", "Free blocks of the KV cache",
                                                labels=["model"]),
        }
        counters = {
            "generated_tokens": CounterMetricFamily("vicuna_engine_generated_tokens", "Tokens generated",
                                                    labels=["model"]),
            "prompt_tokens": CounterMetricFamily("vicuna_engine_prompt_tokens", "Prompt tokens prefilled",
                                                 labels=["model"]),
            "requests_finished": CounterMetricFamily("vicuna_engine_requests_finished", "Requests completed",
                                                     labels=["model"]),
            "requests_aborted": CounterMetricFamily(
                "vicuna_engine_requests_aborted", "Requests aborted (client went away)", labels=["model"]),
            "preemptions": CounterMetricFamily(
                "vicuna_engine_preemptions", "Requests preempted when KV blocks ran out (recomputed later)",
                labels=["model"]),
            "prefix_cache_queries": CounterMetricFamily(
                "vicuna_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=["model"]),
            "prefix_cache_hits": CounterMetricFamily(
                "vicuna_prefix_cache_hits", "Prompt tokens found in the prefix cache (not recomputed)",
                labels=["model"]),
            "spec_draft_tokens": CounterMetricFamily(
                "vicuna_spec_decode_num_draft_tokens", "Speculative draft tokens verified", labels=["model"]),
            "spec_accepted_tokens": CounterMetricFamily(
                "vicuna_spec_decode_num_accepted_tokens", "Speculative draft tokens accepted", labels=["model"]),
        }
        for name, engine in self.engines().items():
            if getattr(engine, "base_engine", None) is not None:
                continue  # a LoRA adapter's view: its engine is counted once, under the engine's name
            s = engine.stats()
            for key, fam in (*gauges.items(), *counters.items()):
                fam.add_metric([name], float(getattr(s, key, 0)))
        yield from gauges.values()
        yield from counters.values()


class Metrics:
    """Per-app registry: request counts by status, time to first token, latency, tokens."""

    def __init__(self, engines: Callable[[], dict[str, Any]] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("vicuna_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("vicuna_time_to_first_token_seconds", "Time from request to first generated text",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("vicuna_request_duration_seconds", "Generation request duration",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.completion_tokens = Counter("vicuna_completion_tokens", "Completion tokens returned", ["model"],
                                         registry=self.registry)
        self.prompt_tokens = Counter("vicuna_prompt_tokens", "Prompt tokens received", ["model"],
                                     registry=self.registry)
        if engines is not None:
            self.registry.register(EngineCollector(engines))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
