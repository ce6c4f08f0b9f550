"""Conversion between the evaluator's protos and its domain types."""

from __future__ import annotations

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from services.common.errors import InvalidArgument
from services.evaluator.core.models import (
    DEFAULT_BERTSCORE_WEIGHT,
    DEFAULT_JUDGE_WEIGHT,
    Evaluation,
    EvaluationInput,
    JudgeOptions,
    TaskType,
    Weights,
)
from services.evaluator.core.rescaling import RescaleMode

_TASKS: dict[int, TaskType] = {
    common_pb2.TASK_TYPE_CLASSIFICATION: TaskType.CLASSIFICATION,
    common_pb2.TASK_TYPE_GENERATION: TaskType.GENERATION,
}
_TASKS_BACK = {
    TaskType.CLASSIFICATION: common_pb2.TASK_TYPE_CLASSIFICATION,
    TaskType.GENERATION: common_pb2.TASK_TYPE_GENERATION,
}


_RESCALES: dict[evaluator_pb2.BertScoreRescale.ValueType, RescaleMode] = {
    evaluator_pb2.BERTSCORE_RESCALE_NONE: RescaleMode.NONE,
    evaluator_pb2.BERTSCORE_RESCALE_PACKAGED: RescaleMode.PACKAGED,
    evaluator_pb2.BERTSCORE_RESCALE_REFERENCES: RescaleMode.REFERENCES,
}
_RESCALES_BACK = {mode: value for value, mode in _RESCALES.items()}


def task_from_proto(value: int) -> TaskType | None:
    """The domain task type; None for UNSPECIFIED or unknown values (rejected later)."""
    return _TASKS.get(value)


def rescale_from_proto(value: evaluator_pb2.BertScoreRescale.ValueType) -> RescaleMode | None:
    """The requested rescaling; None for UNSPECIFIED (the evaluator's setting).

    Raises:
        InvalidArgument: a value this evaluator does not know.
    """
    if value == evaluator_pb2.BERTSCORE_RESCALE_UNSPECIFIED:
        return None
    mode = _RESCALES.get(value)
    if mode is None:
        raise InvalidArgument(
            f"unknown value {value}; use BERTSCORE_RESCALE_NONE, _PACKAGED or _REFERENCES "
            "(or leave it unset for the evaluator's setting)",
            field="bertscore_rescale",
        )
    return mode


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
        bertscore_rescale=rescale_from_proto(request.bertscore_rescale),
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
                rescaled_with_baseline=bert.baseline is not None,
                # None: a scorer that does not report it, i.e. one that never rescales.
                raw_f1=bert.f1_mean if bert.raw_f1_mean is None else bert.raw_f1_mean,
                baseline_f1=bert.baseline.f1 if bert.baseline is not None else 0.0,
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


def response_to_proto(evaluation: Evaluation) -> evaluator_pb2.EvaluateResponse:
    """The domain evaluation as an EvaluateResponse: the result and how it was reached."""
    response = evaluator_pb2.EvaluateResponse(
        result=result_to_proto(evaluation), reasoning_stripped=evaluation.reasoning_stripped
    )
    bert = evaluation.bertscore
    if bert is not None:
        kind = bert.baseline.kind if bert.baseline is not None else RescaleMode.NONE
        response.bertscore_rescale = _RESCALES_BACK[kind]
    return response
