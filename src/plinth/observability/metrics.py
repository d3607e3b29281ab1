"""Prometheus metrics of the data plane.

With several workers, prometheus-client's multiprocess mode is used (the CLI sets
PROMETHEUS_MULTIPROC_DIR before the workers start) and /metrics aggregates every worker's files.
Label values come from the catalog, never from raw client input, to keep cardinality bounded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

REQUESTS = Counter("plinth_requests", "Requests answered by the gateway.", ["route", "model", "status"])
REQUEST_LATENCY = Histogram(
    "plinth_request_duration_seconds",
    "Time from request received to response complete (to first byte for streams).",
    ["route", "model"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD = Histogram(
    "plinth_overhead_seconds",
    "Time spent inside Plinth, excluding upstream waits.",
    ["route"],
    buckets=_OVERHEAD_BUCKETS,
)
TOKENS = Counter("plinth_tokens", "Tokens metered.", ["model", "kind"])
UPSTREAM_ERRORS = Counter("plinth_upstream_errors", "Failed upstream attempts.", ["deployment", "kind"])
CACHE_LOOKUPS = Counter(
    "plinth_cache_lookups",
    "Response-cache lookups by mode and result (hit_exact, hit_semantic, miss, error).",
    ["mode", "result"],
)
UPSTREAM_LATENCY = Histogram(
    "plinth_upstream_duration_seconds",
    "Upstream time per request (to first event for streams), all attempts.",
    ["deployment"],
    buckets=_LATENCY_BUCKETS,
)


@dataclass(frozen=True, slots=True)
class RequestMeters:
    """The labelled children one (route, model) pair uses, looked up once: `labels()` is not free."""

    latency: Histogram
    overhead: Histogram
    input_tokens: Counter
    output_tokens: Counter
    cached_input_tokens: Counter


@lru_cache(maxsize=4096)
def request_meters(route: str, model: str) -> RequestMeters:
    return RequestMeters(
        latency=REQUEST_LATENCY.labels(route, model),
        overhead=OVERHEAD.labels(route),
        input_tokens=TOKENS.labels(model, "input"),
        output_tokens=TOKENS.labels(model, "output"),
        cached_input_tokens=TOKENS.labels(model, "cached_input"),
    )


@lru_cache(maxsize=4096)
def requests_counter(route: str, model: str, status: int) -> Counter:
    return REQUESTS.labels(route, model, str(status))


@lru_cache(maxsize=1024)
def upstream_latency(deployment: str) -> Histogram:
    return UPSTREAM_LATENCY.labels(deployment)


def render() -> tuple[bytes, str]:
    """The exposition text, aggregated over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
