"""The evaluator's core: validates a request, computes its metrics, combines the objective."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.classification import classification_report
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.reasoning import strip_reasoning
from services.evaluator.core.bertscore import BertScoreResult
from services.evaluator.core.models import (
    DEFAULT_JUDGE_SAMPLE_SIZE,
    BertScorer,
    Evaluation,
    EvaluationInput,
    JudgeItem,
    JudgeResult,
    JudgeScorer,
    TaskType,
    Weights,
)
from services.evaluator.core.rescaling import (
    Baseline,
    BaselineUnavailable,
    ReferenceBaselines,
    RescaleMode,
    distinct_references,
)
from services.evaluator.metrics import EvaluatorMetrics

logger = logging.getLogger(__name__)

WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class EvaluatorOptions:
    """Behaviour settings of the core, taken from the service settings."""

    judge_min_coverage: float = 0.6
    judge_timeout_seconds: float = 120.0
    # How BERTScore is rescaled when a request does not say (LORATUNE_BERTSCORE_RESCALE).
    bertscore_rescale: RescaleMode = RescaleMode.NONE


def judge_sample(n_items: int, sample_size: int, seed: int) -> tuple[int, ...]:
    """Deterministic sample of item indices: the same (n, size, seed) picks the same items.

    Every trial of a study evaluates the same validation set with the same seed, so
    the judge scores the same items in every trial and the trials stay comparable.
    """
    k = min(sample_size, n_items)
    return tuple(sorted(random.Random(seed).sample(range(n_items), k)))


def strip_reasoning_blocks(predictions: Sequence[str]) -> tuple[list[str], int]:
    """Predictions without reasoning blocks, and how many had one.

    A prediction "had one" when stripping changed more than its surrounding whitespace
    (which neither BERTScore nor the judge sees anyway).
    """
    cleaned = [strip_reasoning(p) for p in predictions]
    had = sum(1 for raw, clean in zip(predictions, cleaned, strict=True) if clean != raw.strip())
    return cleaned, had


def validate(request: EvaluationInput) -> None:
    """Raises InvalidArgument, naming the field, for any request that cannot be evaluated."""
    if request.task is None:
        raise InvalidArgument(
            "must be TASK_TYPE_CLASSIFICATION or TASK_TYPE_GENERATION", field="task_type"
        )
    n = len(request.predictions)
    if n == 0:
        raise InvalidArgument("must not be empty", field="predictions")
    if len(request.references) != n:
        raise InvalidArgument(
            f"has {len(request.references)} items but predictions has {n}; "
            "they must pair one to one",
            field="references",
        )
    if request.prompts and len(request.prompts) != n:
        raise InvalidArgument(
            f"has {len(request.prompts)} items but predictions has {n}; "
            "give one prompt per prediction or none",
            field="prompts",
        )
    _validate_weights(request.weights)
    judge = request.judge
    if judge.enabled:
        if request.task is TaskType.CLASSIFICATION:
            raise InvalidArgument(
                "the LLM judge scores generated texts; turn it off for classification",
                field="judge.enabled",
            )
        if judge.sample_size is not None and judge.sample_size < 1:
            raise InvalidArgument(
                f"must be at least 1 when the judge is enabled (got {judge.sample_size})",
                field="judge.sample_size",
            )
    if request.task is TaskType.GENERATION and request.bertscore_rescale is RescaleMode.REFERENCES:
        distinct = len(distinct_references(request.references))
        if distinct < 2:
            raise InvalidArgument(
                "BERTSCORE_RESCALE_REFERENCES needs at least 2 distinct non-empty references "
                f"to compute its baseline from mismatched pairs (got {distinct})",
                field="bertscore_rescale",
            )


def _validate_weights(weights: Weights) -> None:
    for name, value in (("bertscore", weights.bertscore), ("judge", weights.judge)):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(
                f"must be a non-negative number (got {value})", field=f"weights.{name}"
            )
    total = weights.bertscore + weights.judge
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise InvalidArgument(
            f"bertscore + judge must sum to 1 (got {weights.bertscore:g} + "
            f"{weights.judge:g} = {total:g})",
            field="weights",
        )


class Evaluator:
    """Scores predictions: classification metrics, or BERTScore plus the optional judge.

    CPU work (BERTScore, metrics over large inputs) runs in worker threads, never on
    the event loop. The BERTScore engine is created on first use, once.
    """

    def __init__(
        self,
        bertscorer_factory: Callable[[], BertScorer],
        judge: JudgeScorer | None,
        options: EvaluatorOptions,
        metrics: EvaluatorMetrics,
    ) -> None:
        self._bertscorer_factory = bertscorer_factory
        self._bertscorer: BertScorer | None = None
        self._bertscorer_lock = threading.Lock()
        self._judge = judge
        self._options = options
        self._metrics = metrics
        self._reference_baselines = ReferenceBaselines()

    def bertscorer(self) -> BertScorer:
        """The long-lived BERTScore engine, loaded on first use (thread-safe)."""
        with self._bertscorer_lock:
            if self._bertscorer is None:
                self._bertscorer = self._bertscorer_factory()
            return self._bertscorer

    async def evaluate(
        self, request: EvaluationInput, deadline_seconds: float | None = None
    ) -> Evaluation:
        """Validates and evaluates one request; `deadline_seconds` bounds the judge call."""
        validate(request)
        assert request.task is not None  # checked by validate
        started = time.perf_counter()
        if request.task is TaskType.CLASSIFICATION:
            result = await self._classification(request)
        else:
            result = await self._generation(request, deadline_seconds)
        seconds = time.perf_counter() - started
        self._metrics.evaluations.labels(task_type=request.task.value).inc()
        self._metrics.evaluation_seconds.labels(task=request.task.value).observe(seconds)
        return dataclasses.replace(result, seconds=seconds)

    async def _classification(self, request: EvaluationInput) -> Evaluation:
        report = await asyncio.to_thread(
            classification_report, request.predictions, request.references, request.labels
        )
        logger.info(
            "Detailed evaluation: Accuracy=%.4f, F1 macro=%.4f, F1 micro=%.4f, worst=%s",
            report.accuracy,
            report.f1_macro,
            report.f1_micro,
            list(report.worst_classes),
        )
        return Evaluation(
            task=TaskType.CLASSIFICATION,
            num_examples=len(request.predictions),
            objective=report.f1_macro,
            objective_name="f1_macro",
            classification=report,
        )

    async def _generation(
        self, request: EvaluationInput, deadline_seconds: float | None
    ) -> Evaluation:
        predictions, stripped = strip_reasoning_blocks(request.predictions)
        if stripped:
            logger.info(
                "%d of %d predictions had a reasoning block, stripped before scoring",
                stripped,
                len(predictions),
            )
            self._metrics.reasoning_stripped.inc(stripped)
        request = dataclasses.replace(request, predictions=predictions)
        # Resolved before the judge is asked, so a rescaling that cannot be honoured costs
        # no judge call; without rescaling nothing waits.
        baseline = None
        if self._rescale_mode(request) is not RescaleMode.NONE:
            baseline = await asyncio.to_thread(self._baseline, request)
        judge_options = request.judge
        if judge_options.enabled:
            if self._judge is None:
                raise FailedPrecondition(
                    "the LLM judge is enabled but no judge gateway is configured "
                    "(set LORATUNE_JUDGE_ADDRESS)",
                    field="judge.enabled",
                )
            logger.info(
                "LLM Judge enabled with model: %s", judge_options.model_id or "(gateway default)"
            )
            bertscore, judge = await asyncio.gather(
                self._bertscore(request, baseline), self._judge_sample(request, deadline_seconds)
            )
        else:
            logger.info("LLM Judge disabled, using BERTScore only")
            bertscore, judge = await self._bertscore(request, baseline), None

        if judge is None:
            combined = bertscore.f1_mean
            logger.info("Detailed evaluation: BERTScore=%.4f, Combined=%.4f", combined, combined)
        else:
            weights = request.weights
            combined = (
                weights.bertscore * bertscore.f1_mean + weights.judge * judge.mean_score / 100
            )
            logger.info(
                "Detailed evaluation: BERTScore=%.4f, LLM Judge=%.2f, Combined=%.4f",
                bertscore.f1_mean,
                judge.mean_score,
                combined,
            )
        return Evaluation(
            task=TaskType.GENERATION,
            num_examples=len(request.predictions),
            objective=combined,
            objective_name="combined",
            combined=combined,
            bertscore=bertscore,
            judge=judge,
            reasoning_stripped=stripped,
        )

    def _rescale_mode(self, request: EvaluationInput) -> RescaleMode:
        return request.bertscore_rescale or self._options.bertscore_rescale

    def _baseline(self, request: EvaluationInput) -> Baseline | None:
        """The rescaling baseline of a generation request (blocking: a worker thread).

        A rescaling the request asks for and that cannot be honoured is INVALID_ARGUMENT;
        the evaluator's own setting instead falls back to no rescaling with a warning, so a
        study whose references allow no baseline still runs (every trial the same way, and
        the hash says the scores are not rescaled).
        """
        mode = self._rescale_mode(request)
        explicit = request.bertscore_rescale is not None
        scorer = self.bertscorer()
        if mode is RescaleMode.PACKAGED:
            try:
                return scorer.packaged_baseline()
            except ValueError as exc:
                if explicit:
                    raise InvalidArgument(
                        f"BERTSCORE_RESCALE_PACKAGED cannot be honoured: {exc}",
                        field="bertscore_rescale",
                    ) from exc
                raise FailedPrecondition(
                    f"LORATUNE_BERTSCORE_RESCALE=packaged cannot be honoured: {exc}"
                ) from exc
        if mode is RescaleMode.REFERENCES:
            started = time.perf_counter()
            try:
                baseline, computed = self._reference_baselines.get(scorer, request.references)
            except BaselineUnavailable as exc:
                if explicit:
                    raise InvalidArgument(
                        f"BERTSCORE_RESCALE_REFERENCES cannot be honoured: {exc}",
                        field="bertscore_rescale",
                    ) from exc
                logger.warning(
                    "LORATUNE_BERTSCORE_RESCALE=references: %s; BERTScore is not rescaled", exc
                )
                return None
            if computed:
                self._metrics.reference_baseline_seconds.observe(time.perf_counter() - started)
            return baseline
        return None

    async def _bertscore(
        self, request: EvaluationInput, baseline: Baseline | None
    ) -> BertScoreResult:
        def run() -> BertScoreResult:
            scorer = self.bertscorer()
            started = time.perf_counter()
            result = scorer.score(request.predictions, request.references, baseline)
            self._metrics.bertscore_seconds.observe(time.perf_counter() - started)
            return result

        result = await asyncio.to_thread(run)
        self._metrics.record_bertscore(result)
        if result.baseline is not None:
            logger.info(
                "BERTScore F1 rescaled with the %s baseline F=%.4f: raw %.4f -> %.4f",
                result.baseline.kind.value,
                result.baseline.f1,
                result.raw_f1_mean if result.raw_f1_mean is not None else float("nan"),
                result.f1_mean,
            )
        if result.empty:
            logger.warning(
                "%d of %d pairs had an empty text and scored 0", result.empty, result.pairs
            )
        if result.truncated:
            logger.warning(
                "%d texts were longer than the model's maximum length and were truncated",
                result.truncated,
            )
        return result

    async def _judge_sample(
        self, request: EvaluationInput, deadline_seconds: float | None
    ) -> JudgeResult:
        assert self._judge is not None
        options = request.judge
        size = options.sample_size if options.sample_size is not None else DEFAULT_JUDGE_SAMPLE_SIZE
        indices = judge_sample(len(request.predictions), size, options.seed)
        items = [
            JudgeItem(
                prompt=request.prompts[i] if request.prompts else "",
                candidate=request.predictions[i],
                reference=request.references[i],
            )
            for i in indices
        ]
        timeout = self._options.judge_timeout_seconds
        if deadline_seconds is not None:
            timeout = min(timeout, deadline_seconds)
        batch = await self._judge.score(options.model_id, items, timeout)
        result = JudgeResult(
            model_id=options.model_id,
            mean_score=batch.mean,
            judged=batch.judged,
            requested=len(items),
            provider_model=batch.provider_model,
            sample_indices=indices,
        )
        if result.coverage < self._options.judge_min_coverage:
            raise Unavailable(
                f"the LLM judge scored only {result.judged} of {result.requested} sampled items "
                f"(coverage {result.coverage:.2f} < LORATUNE_JUDGE_MIN_COVERAGE="
                f"{self._options.judge_min_coverage:g}); no combined score is returned, so that "
                "it is never defined differently from other trials"
            )
        logger.info("LLM Judge mean score: %.2f (on %d examples)", result.mean_score, result.judged)
        return result
