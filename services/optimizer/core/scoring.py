"""Scoring a trial's epoch with the evaluator: retries while it is away, and the log lines.

An evaluation the evaluator refuses as UNAVAILABLE (the evaluator away, the judge gateway or
its provider away, or too few of the judge's sample judged: LORATUNE_JUDGE_MIN_COVERAGE) is
asked again with the same predictions until it is scored whole, never scored without the
missing judgments; how many attempts were refused, and the last reason, stay with the score.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.errors import Unavailable
from services.common.names import excerpt
from services.optimizer import metrics
from services.optimizer.core.ports import (
    Evaluation,
    EvaluationRequest,
    EvaluatorPort,
    JobEvaluation,
    JudgeOptions,
)
from services.optimizer.core.records import StudySpec
from services.optimizer.core.views import excluded_note

logger = logging.getLogger(__name__)

# The longest refusal reason kept with a score (the evaluator's own run to ~200 characters).
REFUSAL_EXCERPT = 300


@dataclass(frozen=True)
class Scored:
    """An epoch's evaluation, and the attempts at it refused as UNAVAILABLE before it."""

    evaluation: Evaluation
    refusals: int = 0
    last_refusal: str = ""  # the last refusal's reason, at most REFUSAL_EXCERPT characters


class Scoring:
    """The evaluator, as trials use it."""

    def __init__(self, evaluator: EvaluatorPort, retry_seconds: float) -> None:
        self._evaluator = evaluator
        self._retry_seconds = retry_seconds

    async def score(
        self, spec: StudySpec, point: JobEvaluation, excluded: list[dict[str, Any]]
    ) -> Scored:
        """Scores an epoch, retrying while the evaluator is away (its predictions are kept).

        Every refusal is counted: a score that came only after the judge recovered says so.
        Past `retry_seconds` the last refusal is raised, with the count in its message.

        `excluded`: the classes the trial did not train on; the evaluator cannot know them,
        so they are stated in the document (their rows already count as misses).
        """
        judge = None
        if not spec.dataset.classification:
            judge = JudgeOptions(
                enabled=spec.fine_tuning.use_llm_judge,
                judge_model_id=spec.fine_tuning.judge_model_id,
                sample_size=spec.judge_sample_size,
                seed=spec.dataset.seed,
            )
        request = EvaluationRequest(
            classification=spec.dataset.classification,
            predictions=point.predictions,
            references=point.references,
            prompts=point.prompts,
            labels=point.labels,
            judge=judge,
        )
        started = time.monotonic()
        deadline = started + self._retry_seconds
        delay = 0.5
        refusals, last_refusal = 0, ""
        while True:
            try:
                evaluation = await self._evaluator.evaluate(request)
                break
            except Unavailable as err:
                refusals += 1
                last_refusal = excerpt(str(err), REFUSAL_EXCERPT)
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"{err.message} (refused {refusals} times in "
                        f"{time.monotonic() - started:.0f} s)",
                        field=err.field,
                    ) from err
                metrics.EVALUATION_RETRIES.inc()
                logger.warning(
                    "evaluation refused (%s); retrying in %.1f s (attempt %d)",
                    last_refusal,
                    delay,
                    refusals + 1,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        if excluded and spec.dataset.classification:
            # The evaluator cannot know which classes were left out of training: say so.
            document = dict(evaluation.document)
            document["excludedClasses"] = [
                {"label": c["label"], "trainRows": c["train_rows"]}
                | {"validationRows": c["validation_rows"]}
                for c in excluded
            ]
            document["excludedNote"] = excluded_note(excluded)
            evaluation = Evaluation(
                evaluation.objective, evaluation.objective_name, evaluation.figures, document
            )
        return Scored(evaluation, refusals, last_refusal)


def log_evaluation(number: int, params: dict[str, Any], scored: Scored) -> None:
    """The users' log lines of one evaluated epoch, then what it took to score it."""
    _log_figures(number, params, scored.evaluation.figures)
    _log_scoring_notes(number, scored)


def _log_figures(number: int, params: dict[str, Any], f: Mapping[str, float]) -> None:
    if "f1_macro" in f:
        logger.info("Trial %d: params=%s, F1 macro=%.4f", number, params, f["f1_macro"])
        logger.info(
            "Detailed evaluation: Accuracy=%.4f, F1 macro=%.4f, F1 micro=%.4f",
            f.get("accuracy", 0.0),
            f["f1_macro"],
            f.get("f1_micro", 0.0),
        )
        return
    logger.info("Trial %d: params=%s, BERTScore=%.4f", number, params, f.get("bertscore_f1", 0.0))
    if "judge_mean" in f:
        logger.info(
            "Detailed evaluation: BERTScore=%.4f, LLM Judge=%.2f, Combined=%.4f",
            f.get("bertscore_f1", 0.0),
            f["judge_mean"],
            f.get("combined", 0.0),
        )
    else:
        logger.info(
            "Detailed evaluation: BERTScore=%.4f, Combined=%.4f",
            f.get("bertscore_f1", 0.0),
            f.get("combined", 0.0),
        )


def _log_scoring_notes(number: int, scored: Scored) -> None:
    """A partial judgment and refused attempts, which the figures alone do not show."""
    judge = scored.evaluation.document.get("judge")
    if isinstance(judge, Mapping) and float(judge.get("coverage", 0.0)) < 1.0:
        logger.warning(
            "Trial %d: the LLM judge scored %d of %d sampled items (coverage %.2f)",
            number,
            int(judge.get("judged", 0)),
            int(judge.get("requested", 0)),
            float(judge.get("coverage", 0.0)),
        )
    if scored.refusals:
        logger.warning(
            "Trial %d: scored after %d refused evaluation attempts (last: %s)",
            number,
            scored.refusals,
            scored.last_refusal,
        )
