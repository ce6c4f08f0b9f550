"""Prometheus metrics of the judge gateway (labels: registry ids and fixed enums only)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "loratune_judge_requests_total",
    "Items judged, by judge model and outcome.",
    ["judge_model_id", "outcome"],
)
REQUEST_DURATION = Histogram(
    "loratune_judge_request_duration_seconds",
    "Time to judge one item, cache and retries included.",
    ["judge_model_id"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PROVIDER_LATENCY = Histogram(
    "loratune_judge_provider_latency_seconds",
    "Time of one provider call (one attempt).",
    ["judge_model_id"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RETRIES = Counter(
    "loratune_judge_retries_total",
    "Provider calls retried, by reason.",
    ["judge_model_id", "reason"],
)
CACHE_HITS = Counter("loratune_judge_cache_hits_total", "Judgments served from the cache.")
CACHE_MISSES = Counter("loratune_judge_cache_misses_total", "Judgments not in the cache.")
INFLIGHT = Gauge("loratune_judge_inflight", "Provider calls in flight.")
TOKENS = Counter(
    "loratune_judge_tokens_total",
    "Tokens reported by the providers.",
    ["judge_model_id", "type"],
)
CIRCUIT_OPEN = Gauge(
    "loratune_judge_circuit_open",
    "1 while the breaker of the judge model's provider is open.",
    ["judge_model_id"],
)


def declare_models(model_ids: list[str], outcomes: list[str], retry_reasons: list[str]) -> None:
    """Creates every label set of the registered judge models at 0 (none is reset)."""
    for model_id in model_ids:
        CIRCUIT_OPEN.labels(judge_model_id=model_id)
        REQUEST_DURATION.labels(judge_model_id=model_id)
        PROVIDER_LATENCY.labels(judge_model_id=model_id)
        for outcome in outcomes:
            REQUESTS.labels(judge_model_id=model_id, outcome=outcome)
        for kind in ("input", "output"):
            TOKENS.labels(judge_model_id=model_id, type=kind)
        for reason in retry_reasons:
            RETRIES.labels(judge_model_id=model_id, reason=reason)
