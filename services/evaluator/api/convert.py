"""Conversion between the evaluator's protos and its domain types."""

from __future__ import annotations

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from services.evaluator.core.models import (
    DEFAULT_BERTSCORE_WEIGHT,
    DEFAULT_JUDGE_WEIGHT,
    Evaluation,
    EvaluationInput,
    JudgeOptions,
    TaskType,
    Weights,
)

_TASKS: dict[int, TaskType] = {
    common_pb2.TASK_TYPE_CLASSIFICATION: TaskType.CLASSIFICATION,
    common_pb2.TASK_TYPE_GENERATION: TaskType.GENERATION,
}
_TASKS_BACK = {
    TaskType.CLASSIFICATION: common_pb2.TASK_TYPE_CLASSIFICATION,
    TaskType.GENERATION: common_pb2.TASK_TYPE_GENERATION,
}


def task_from_proto(value: int) -> TaskType | None:
    """The domain task type; None for UNSPECIFIED or unknown values (rejected later)."""
    return _TASKS.get(value)


def input_from_proto(request: evaluator_pb2.EvaluateRequest) -> EvaluationInput:
    """An EvaluateRequest as domain input; absent optional fields take their defaults."""
    judge = request.judge
    weights = request.weights
    return EvaluationInput(
        task=task_from_proto(request.task_type),
        predictions=list(request.predictions),
        references=list(request.references),
        prompts=list(request.prompts),
        labels=list(request.labels),
        judge=JudgeOptions(
            enabled=judge.enabled,
            model_id=judge.judge_model_id,
            sample_size=judge.sample_size if judge.HasField("sample_size") else None,
            seed=judge.seed,
        ),
        weights=Weights(
            bertscore=weights.bertscore
            if weights.HasField("bertscore")
            else DEFAULT_BERTSCORE_WEIGHT,
            judge=weights.judge if weights.HasField("judge") else DEFAULT_JUDGE_WEIGHT,
        ),
    )


def result_to_proto(evaluation: Evaluation) -> common_pb2.EvaluationResult:
    """The domain evaluation as the contract's EvaluationResult."""
    result = common_pb2.EvaluationResult(
        task_type=_TASKS_BACK[evaluation.task],
        combined_score=evaluation.combined,
        objective=evaluation.objective,
        objective_name=evaluation.objective_name,
        num_examples=evaluation.num_examples,
        seconds=evaluation.seconds,
    )
    report = evaluation.classification
    if report is not None:
        result.classification.CopyFrom(
            common_pb2.ClassificationMetrics(
                accuracy=report.accuracy,
                f1_macro=report.f1_macro,
                f1_micro=report.f1_micro,
                f1_weighted=report.f1_weighted,
                precision_macro=report.precision_macro,
                recall_macro=report.recall_macro,
                per_class=[
                    common_pb2.ClassMetrics(
                        label=c.label,
                        precision=c.precision,
                        recall=c.recall,
                        f1=c.f1,
                        support=c.support,
                    )
                    for c in report.per_class
                ],
                confusion_matrix=common_pb2.ConfusionMatrix(
                    labels=report.labels,
                    counts=[v for row in report.confusion for v in row],
                ),
                worst_classes=report.worst_classes,
            )
        )
    bert = evaluation.bertscore
    if bert is not None:
        result.bertscore.CopyFrom(
            common_pb2.BertScore(
                precision=bert.precision_mean,
                recall=bert.recall_mean,
                f1=bert.f1_mean,
                model=bert.model,
                hash=bert.hash,
                num_layers=bert.num_layers,
                pairs=bert.pairs,
                empty_texts=bert.empty,
                truncated_texts=bert.truncated,
                rescaled_with_baseline="rescaled" in bert.hash,
            )
        )
    judge = evaluation.judge
    if judge is not None:
        result.judge.CopyFrom(
            common_pb2.JudgeSummary(
                judge_model_id=judge.model_id,
                mean_score=judge.mean_score,
                judged=judge.judged,
                requested=judge.requested,
                coverage=judge.coverage,
                provider_model=judge.provider_model,
                sample_indices=judge.sample_indices,
            )
        )
    return result
