"""Scoring a trial's epoch with the evaluator: retries while it is away, and the log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.common.errors import Unavailable
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


class Scoring:
    """The evaluator, as trials use it."""

    def __init__(self, evaluator: EvaluatorPort, retry_seconds: float) -> None:
        self._evaluator = evaluator
        self._retry_seconds = retry_seconds

    async def score(
        self, spec: StudySpec, point: JobEvaluation, excluded: list[dict[str, Any]]
    ) -> Evaluation:
        """Scores an epoch, retrying while the evaluator is away (its predictions are kept).

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
        deadline = time.monotonic() + self._retry_seconds
        delay = 0.5
        while True:
            try:
                evaluation = await self._evaluator.evaluate(request)
                break
            except Unavailable:
                if time.monotonic() + delay > deadline:
                    raise
                metrics.EVALUATION_RETRIES.inc()
                logger.warning("evaluator unavailable; retrying in %.1f s", delay)
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
        return evaluation


def log_evaluation(number: int, params: dict[str, Any], evaluation: Evaluation) -> None:
    """The users' log lines of one evaluated epoch."""
    f = evaluation.figures
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
