"""Prometheus metrics of the evaluator (process-wide, bounded labels only)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from services.evaluator.core.bertscore import BertScoreResult

_EVALUATIONS = Counter(
    "loratune_evaluator_evaluations_total", "Evaluations completed.", ["task_type"]
)
# task: classification | generation (TaskType values); both exist from the start.
_EVALUATION_SECONDS = Histogram(
    "loratune_evaluator_evaluation_seconds",
    "Time to evaluate one request (BERTScore and the judge included), by task.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
for _task in ("classification", "generation"):
    _EVALUATION_SECONDS.labels(task=_task)
    _EVALUATIONS.labels(task_type=_task)
_BERTSCORE_SECONDS = Histogram(
    "loratune_evaluator_bertscore_seconds",
    "Time spent computing BERTScore for one evaluation.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
_BERTSCORE_PAIRS = Counter(
    "loratune_evaluator_bertscore_pairs_total", "Candidate / reference pairs scored."
)
_BERTSCORE_RESCALED = Counter(
    "loratune_evaluator_bertscore_rescale_total",
    "BERTScore computations by the rescaling applied (none, packaged, references).",
    ["rescale"],
)
_REFERENCE_BASELINE_SECONDS = Histogram(
    "loratune_evaluator_reference_baseline_seconds",
    "Time spent computing a BERTScore baseline from references (not counting cache hits).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
_EMPTY_TEXTS = Counter(
    "loratune_evaluator_empty_texts_total", "Pairs with an empty candidate or reference (score 0)."
)
_TRUNCATED_TEXTS = Counter(
    "loratune_evaluator_truncated_texts_total",
    "Texts longer than the BERTScore model's maximum length, truncated.",
)
_REASONING_STRIPPED = Counter(
    "loratune_evaluator_reasoning_stripped_total",
    "Generated predictions that had a reasoning block, stripped before scoring.",
)
_CACHE_HITS = Counter(
    "loratune_evaluator_reference_cache_hits_total",
    "Texts whose embeddings came from the embedding cache.",
)
_CACHE_MISSES = Counter(
    "loratune_evaluator_reference_cache_misses_total",
    "Texts whose embeddings had to be computed.",
)


@dataclass(frozen=True)
class EvaluatorMetrics:
    """Handles on the evaluator's metrics, passed to the core."""

    evaluations: Counter = _EVALUATIONS
    evaluation_seconds: Histogram = _EVALUATION_SECONDS
    bertscore_seconds: Histogram = _BERTSCORE_SECONDS
    bertscore_pairs: Counter = _BERTSCORE_PAIRS
    bertscore_rescaled: Counter = _BERTSCORE_RESCALED
    reference_baseline_seconds: Histogram = _REFERENCE_BASELINE_SECONDS
    empty_texts: Counter = _EMPTY_TEXTS
    truncated_texts: Counter = _TRUNCATED_TEXTS
    reasoning_stripped: Counter = _REASONING_STRIPPED
    cache_hits: Counter = _CACHE_HITS
    cache_misses: Counter = _CACHE_MISSES

    def record_bertscore(self, result: BertScoreResult) -> None:
        """Counts one BERTScore call's pairs, rescaling, empties, truncations and cache use."""
        self.bertscore_pairs.inc(result.pairs)
        rescale = "none" if result.baseline is None else result.baseline.kind.value
        self.bertscore_rescaled.labels(rescale=rescale).inc()
        self.empty_texts.inc(result.empty)
        self.truncated_texts.inc(result.truncated)
        self.cache_hits.inc(result.cache_hits)
        self.cache_misses.inc(result.cache_misses)
