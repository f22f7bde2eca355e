"""Prometheus metrics, one registry per app so several apps can live in one process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hypergen_requests_total", "HTTP requests", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "hypergen_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.cache_hits = Counter("hypergen_cache_hits_total", "Adapter cache hits", ["tier"], registry=r)
        self.cache_misses = Counter("hypergen_cache_misses_total", "Adapter cache misses", ["tier"], registry=r)
        self.cache_corrupt = Counter(
            "hypergen_cache_corrupt_total", "Cache entries dropped for a bad checksum", ["tier"], registry=r
        )
        self.hypernetwork_runs = Counter("hypergen_hypernetwork_runs_total", "Hypernetwork forward passes", registry=r)
        self.generator_fallbacks = Counter(
            "hypergen_generator_fallbacks_total", "Misses generated in the server process because the generator process failed", registry=r)
        self.hypernetwork_seconds = Histogram(
            "hypergen_hypernetwork_seconds", "Encode + hypernetwork + serialise", buckets=LATENCY_BUCKETS, registry=r
        )
        self.generation_stage_seconds = Histogram(
            "hypergen_generation_stage_seconds", "One adapter generation by stage: encode, hypernetwork, tensors, serialise",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.generation_batch_size = Histogram(
            "hypergen_generation_batch_size", "Misses generated in one batched pass (server/miss_batches.py)",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.adapters_resident = Gauge(
            "hypergen_engine_adapters_resident", "Adapters loaded in the engine", registry=r
        )
        self.redis_up = Gauge("hypergen_redis_up", "1 when Redis answered the last call", registry=r)
        self.generated_tokens = Counter("hypergen_generated_tokens_total", "Completion tokens", registry=r)
        self.in_engine = Gauge("hypergen_requests_in_engine", "Requests holding an admission slot", registry=r)
        self.rejected = Counter("hypergen_rejected_total", "Requests refused because the engine was saturated", registry=r)
