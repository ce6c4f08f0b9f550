"""The optimizer's edge: the contract's messages to and from the core's domain types.

Inbound: CreateStudyRequest -> StudyRequest; a projects file's search space (its JSON) ->
the contract's fields. Outbound: StudyView / TrialView / StudyEvent / Project -> Study /
Trial / StudyEvent / Project; and, for the gRPC adapters of the ports (clients.py),
TrainingJob -> StartTrainingRequest, TrainingEvent -> JobEvent, EvaluationRequest ->
EvaluateRequest, EvaluationResult -> Evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import json_format

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from loratune.optimizer.v1 import optimizer_pb2
from loratune.trainer.v1 import trainer_pb2
from services.common.errors import InvalidArgument
from services.common.names import excerpt
from services.optimizer.core.events import (
    StudyEvent,
    StudyFinished,
    StudyWaiting,
    TrialEvaluated,
    TrialFinished,
    TrialProgress,
    TrialStarted,
)
from services.optimizer.core.ports import (
    Evaluation,
    EvaluationRequest,
    ExcludedClass,
    JobCompleted,
    JobDataPrepared,
    JobEvaluation,
    JobEvent,
    JobFailed,
    JobProgress,
    TrainerState,
    TrainingJob,
)
from services.optimizer.core.projects import Project
from services.optimizer.core.records import (
    CLASSIFICATION,
    GENERATION,
    DatasetRef,
    FineTuning,
    Hyperparameters,
    StudyRequest,
    TrainingOverrides,
)
from services.optimizer.core.views import StudyView, TrialView

_TASKS = {
    common_pb2.TASK_TYPE_CLASSIFICATION: CLASSIFICATION,
    common_pb2.TASK_TYPE_GENERATION: GENERATION,
}
_TASK_ENUMS = {name: value for value, name in _TASKS.items()}
_TRIAL_STATES = {
    "RUNNING": optimizer_pb2.TRIAL_STATE_RUNNING,
    "COMPLETE": optimizer_pb2.TRIAL_STATE_COMPLETE,
    "PRUNED": optimizer_pb2.TRIAL_STATE_PRUNED,
    "FAIL": optimizer_pb2.TRIAL_STATE_FAIL,
    "WAITING": optimizer_pb2.TRIAL_STATE_WAITING,
}


# ---- inbound -------------------------------------------------------------------------------


def dataset_from_proto(dataset: common_pb2.DatasetSpec) -> DatasetRef:
    """The domain dataset; an unset task is INVALID_ARGUMENT."""
    task = _TASKS.get(dataset.task_type)
    if task is None:
        raise InvalidArgument(
            "must be TASK_TYPE_CLASSIFICATION or TASK_TYPE_GENERATION", field="dataset.task_type"
        )
    return DatasetRef(
        uri=dataset.uri,
        task=task,
        format=dataset.format,
        text_field=dataset.text_field,
        label_field=dataset.label_field,
        prompt_field=dataset.prompt_field,
        target_field=dataset.target_field,
        validation_uri=dataset.validation_uri,
        validation_fraction=dataset.validation_fraction,
        seed=dataset.seed,
    )


def study_request_from_proto(request: optimizer_pb2.CreateStudyRequest) -> StudyRequest:
    """CreateStudyRequest -> StudyRequest; a dataset left out (or empty) is None: the
    project's."""
    params = request.fine_tuning_params
    training = request.training
    given = request.HasField("dataset") and request.dataset.ByteSize() > 0
    return StudyRequest(
        project_id=request.project_id,
        study_name=request.study_name,
        fine_tuning=FineTuning(
            use_llm_judge=params.use_llm_judge,
            judge_model_id=params.judge_model_id,
            base_model_name=params.base_model_name,
            n_trials=params.n_trials,
            time_budget_seconds=params.time_budget_seconds,
            base_model_names=tuple(params.base_model_names),
        ),
        dataset=dataset_from_proto(request.dataset) if given else None,
        search_space=json_format.MessageToDict(
            request.search_space, preserving_proto_field_name=True
        ),
        training=TrainingOverrides(
            gradient_accumulation=training.gradient_accumulation,
            max_seq_length=training.max_seq_length,
            warmup_ratio=training.warmup_ratio,
            weight_decay=training.weight_decay,
            quantize_4bit=training.quantize_4bit,
            seed=training.seed,
        ),
        max_parallel_trials=request.max_parallel_trials,
        sampler=request.sampler,
        pruner=request.pruner,
        max_eval_samples=request.max_eval_samples,
        judge_sample_size=request.judge_sample_size,
        fine_tuning_given=request.HasField("fine_tuning_params"),
    )


def search_space_from_json(value: Mapping[str, Any]) -> dict[str, Any]:
    """A search space in the contract's JSON (snake_case or camelCase keys) -> its
    snake_case fields, as a request's; InvalidArgument naming `search_space` otherwise."""
    try:
        message = json_format.ParseDict(dict(value), optimizer_pb2.SearchSpace())
    except (json_format.ParseError, TypeError, ValueError) as err:
        first_line = str(err).split("\n", 1)[0]
        raise InvalidArgument(
            f"is not a SearchSpace: {excerpt(first_line, 300)}", field="search_space"
        ) from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# ---- outbound: studies, trials, events -------------------------------------------------------


def dataset_to_proto(dataset: DatasetRef) -> common_pb2.DatasetSpec:
    """DatasetRef -> DatasetSpec."""
    return common_pb2.DatasetSpec(
        uri=dataset.uri,
        format=dataset.format,
        task_type=_TASK_ENUMS[dataset.task],
        text_field=dataset.text_field,
        label_field=dataset.label_field,
        prompt_field=dataset.prompt_field,
        target_field=dataset.target_field,
        validation_uri=dataset.validation_uri,
        validation_fraction=dataset.validation_fraction,
        seed=dataset.seed,
    )


def project_to_proto(project: Project) -> optimizer_pb2.Project:
    """Project -> the contract's Project (search_space and training only when they set any)."""
    message = optimizer_pb2.Project(
        project_id=project.project_id,
        name=project.name,
        dataset=dataset_to_proto(project.dataset),
        base_model_name=project.base_model_name,
        use_llm_judge=project.use_llm_judge,
        judge_model_id=project.judge_model_id,
        n_trials=project.n_trials,
        time_budget_seconds=project.time_budget_seconds,
        base_model_names=list(project.base_model_names),
    )
    if project.search_space:
        json_format.ParseDict(dict(project.search_space), message.search_space)
    training = project.training
    if training != TrainingOverrides():
        message.training.CopyFrom(
            common_pb2.TrainingParams(
                gradient_accumulation=training.gradient_accumulation,
                max_seq_length=training.max_seq_length,
                warmup_ratio=training.warmup_ratio,
                weight_decay=training.weight_decay,
                quantize_4bit=training.quantize_4bit,
                seed=training.seed,
            )
        )
    return message


def hyperparameters_to_proto(hyper: Hyperparameters) -> common_pb2.Hyperparameters:
    """Hyperparameters -> the contract's three groups."""
    return json_format.ParseDict(hyper.to_storage(), common_pb2.Hyperparameters())


def evaluation_to_proto(
    document: Mapping[str, Any], *, detail: bool = True
) -> common_pb2.EvaluationResult:
    """An evaluation document (the contract's JSON) -> EvaluationResult. Without `detail`,
    a classification's per-class metrics and confusion matrix are left out (a list's view).

    The confusion matrix (classes squared: 90,000 counts at 300 classes) is copied in one
    call, not through json_format, which converts a repeated scalar one value at a time
    (1.3 s for one 300-class matrix here)."""
    content = dict(document)
    classification = content.get("classification")
    matrix: Mapping[str, Any] | None = None
    per_class: list[Any] = []
    if isinstance(classification, Mapping):
        classification = dict(classification)
        for key in ("confusionMatrix", "confusion_matrix"):  # the JSON's name, or the field's
            found = classification.pop(key, None)
            matrix = found if isinstance(found, Mapping) else matrix
        for key in ("perClass", "per_class"):
            found = classification.pop(key, None)
            per_class = found if isinstance(found, list) else per_class
        if not detail:
            per_class, matrix = [], None
        content["classification"] = classification
    message = json_format.ParseDict(
        content, common_pb2.EvaluationResult(), ignore_unknown_fields=True
    )
    if per_class:
        message.classification.per_class.extend(_class_metrics(c) for c in per_class)
    if matrix is not None:
        target = message.classification.confusion_matrix
        target.labels.extend(str(label) for label in matrix.get("labels", ()))
        counts = matrix.get("counts", ())
        try:
            target.counts.extend(counts)  # a list of ints, as JSON reads it: one C call
        except (TypeError, ValueError):
            target.counts.extend(int(count) for count in counts)
    return message


def _class_metrics(entry: Any) -> common_pb2.ClassMetrics:
    """One per-class entry of an evaluation document (either field naming)."""
    if not isinstance(entry, Mapping):
        return common_pb2.ClassMetrics()
    return common_pb2.ClassMetrics(
        label=str(entry.get("label", "")),
        precision=float(entry.get("precision", 0.0)),
        recall=float(entry.get("recall", 0.0)),
        f1=float(entry.get("f1", 0.0)),
        support=int(entry.get("support", 0)),
    )


def _stamp(value: str | datetime | None, message: Any) -> None:
    if not value:
        return
    message.FromDatetime(datetime.fromisoformat(value) if isinstance(value, str) else value)


def trial_to_proto(view: TrialView, *, detail: bool = True) -> optimizer_pb2.Trial:
    """TrialView -> Trial (without `detail`: the evaluation without per-class metrics and
    confusion matrix, TRIAL_VIEW_BASIC)."""
    message = optimizer_pb2.Trial(
        number=view.number,
        state=_TRIAL_STATES[view.state],
        artifact_dir=view.artifact_dir,
        trainer=view.trainer,
        attempt=view.attempt,
        failure_reason=view.failure_reason,
        best_epoch=view.best_epoch,
        epoch_objectives=list(view.epoch_objectives),
        interruptions=list(view.interruptions),
    )
    if view.hyperparameters is not None:
        message.hyperparameters.CopyFrom(hyperparameters_to_proto(view.hyperparameters))
    if view.evaluation is not None:
        message.evaluation.CopyFrom(evaluation_to_proto(view.evaluation, detail=detail))
    _stamp(view.start_time, message.start_time)
    _stamp(view.end_time, message.end_time)
    if view.objective is not None:
        message.objective = view.objective
    if view.same_as is not None:
        message.same_as = view.same_as
    message.base_model = view.base_model
    scored = view.scored_with
    if scored is not None:
        message.judge_judged = scored.judge_judged
        message.judge_requested = scored.judge_requested
        if scored.judge_coverage is not None:
            message.judge_coverage = scored.judge_coverage
        message.evaluation_refusals = scored.refusals
        message.last_evaluation_refusal = scored.last_refusal
    return message


def study_to_proto(view: StudyView) -> optimizer_pb2.Study:
    """StudyView -> Study."""
    record, spec = view.record, view.record.spec
    fine = spec.fine_tuning
    message = optimizer_pb2.Study(
        study_id=view.study_id,
        project_id=spec.project_id,
        state=optimizer_pb2.StudyState.Value(f"STUDY_STATE_{record.state}"),
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            use_llm_judge=fine.use_llm_judge,
            judge_model_id=fine.judge_model_id,
            base_model_name=fine.base_model_name,
            n_trials=fine.n_trials,
            time_budget_seconds=fine.time_budget_seconds,
            base_model_names=list(fine.base_model_names),
        ),
        dataset=dataset_to_proto(spec.dataset),
        trials_complete=view.counts.get("COMPLETE", 0),
        trials_pruned=view.counts.get("PRUNED", 0),
        trials_failed=view.counts.get("FAIL", 0),
        trials_running=view.counts.get("RUNNING", 0),
        trials_waiting=view.counts.get("WAITING", 0),
        trials_reused=view.counts.get("REUSED", 0),
        failure_reason=record.failure_reason,
        end_note=record.end_note,
        best_model_dir=record.best_model_dir,
        objective_name=spec.objective_name,
        excluded_classes=[common_pb2.ExcludedClass(**c) for c in record.excluded_classes or []],
        excluded_note=view.excluded_note,
    )
    _stamp(record.create_time or None, message.create_time)
    if not record.create_time:
        message.create_time.SetInParent()
    _stamp(record.start_time, message.start_time)
    _stamp(record.end_time, message.end_time)
    if view.best_trial is not None:
        message.best_trial.CopyFrom(trial_to_proto(view.best_trial))
    if view.waiting_reason:
        message.waiting_reason = view.waiting_reason
        if view.waiting_since is not None:
            message.waiting_since.FromSeconds(int(view.waiting_since))
    if record.report:
        json_format.ParseDict(
            {
                _REPORT_FIELDS.get(key, key): value
                for key, value in record.report.items()
                if value is not None
            },
            message.report,
            ignore_unknown_fields=True,
        )
    return message


# SelectionReport.to_json() keys that the contract names otherwise.
_REPORT_FIELDS = {
    "floor_value": "floor_objective",
    "default_value": "default_objective",
    "selected_value": "selected_objective",
    "ensemble_value": "ensemble_objective",
}


def event_to_proto(event: StudyEvent) -> optimizer_pb2.StudyEvent:
    """StudyEvent -> the contract's StudyEvent."""
    message = optimizer_pb2.StudyEvent(study_id=event.study_id)
    message.time.FromDatetime(event.time)
    body = event.body
    if isinstance(body, TrialStarted):
        message.trial_started.trial.CopyFrom(trial_to_proto(body.trial))
    elif isinstance(body, TrialProgress):
        message.trial_progress.CopyFrom(
            optimizer_pb2.TrialProgress(
                number=body.number,
                epoch=body.epoch,
                step=body.step,
                total_steps=body.total_steps,
                loss=body.loss,
            )
        )
    elif isinstance(body, TrialEvaluated):
        message.trial_evaluated.CopyFrom(
            optimizer_pb2.TrialEvaluated(
                number=body.number,
                epoch=body.epoch,
                evaluation=evaluation_to_proto(body.evaluation.document),
                evaluation_refusals=body.refusals,
                last_evaluation_refusal=body.last_refusal,
            )
        )
    elif isinstance(body, TrialFinished):
        message.trial_finished.trial.CopyFrom(trial_to_proto(body.trial))
    elif isinstance(body, StudyFinished):
        message.study_finished.study.CopyFrom(study_to_proto(body.study))
    elif isinstance(body, StudyWaiting):
        message.study_waiting.reason = body.reason
        message.study_waiting.since.FromSeconds(int(body.since))
    return message


# ---- the ports' messages (used by clients.py) ------------------------------------------------


def job_to_proto(job: TrainingJob) -> trainer_pb2.StartTrainingRequest:
    """TrainingJob -> StartTrainingRequest."""
    return trainer_pb2.StartTrainingRequest(
        job_id=job.job_id,
        base_model=job.base_model,
        dataset=dataset_to_proto(job.dataset),
        hyperparameters=hyperparameters_to_proto(job.hyperparameters),
        output_dir=job.output_dir,
        max_eval_samples=job.max_eval_samples,
    )


def job_event_from_proto(event: trainer_pb2.TrainingEvent) -> JobEvent | None:
    """TrainingEvent -> JobEvent (None for an event the optimizer does not use)."""
    kind = event.WhichOneof("event")
    if kind == "progress":
        p = event.progress
        return JobProgress(p.epoch, p.step, p.total_steps, p.loss)
    if kind == "evaluation":
        e = event.evaluation
        return JobEvaluation(
            epoch=e.epoch,
            step=e.step,
            eval_loss=e.eval_loss,
            predictions=list(e.predictions),
            references=list(e.references),
            prompts=list(e.prompts),
            labels=list(e.labels),
            adapter_dir=e.adapter_dir,
        )
    if kind == "dataset_prepared":
        d = event.dataset_prepared
        return JobDataPrepared(
            excluded=[ExcludedClass(c.label, c.train_rows, c.validation_rows) for c in d.excluded]
        )
    if kind == "completed":
        return JobCompleted(event.completed.artifact_dir)
    if kind == "failed":
        reason = trainer_pb2.FailureReason.Name(event.failed.reason)
        return JobFailed(reason.removeprefix("FAILURE_REASON_"), event.failed.message)
    return None


def trainer_state_from_proto(status: trainer_pb2.GetTrainerStatusResponse) -> TrainerState:
    """GetTrainerStatusResponse -> TrainerState."""
    return TrainerState(busy=status.busy, shutting_down=status.shutting_down)


def evaluation_request_to_proto(request: EvaluationRequest) -> evaluator_pb2.EvaluateRequest:
    """EvaluationRequest -> EvaluateRequest."""
    message = evaluator_pb2.EvaluateRequest(
        task_type=common_pb2.TASK_TYPE_CLASSIFICATION
        if request.classification
        else common_pb2.TASK_TYPE_GENERATION,
        predictions=request.predictions,
        references=request.references,
        prompts=request.prompts,
        labels=request.labels,
    )
    if request.judge is not None:
        message.judge.CopyFrom(
            evaluator_pb2.JudgeOptions(
                enabled=request.judge.enabled,
                judge_model_id=request.judge.judge_model_id,
                seed=request.judge.seed,
            )
        )
        if request.judge.sample_size:
            message.judge.sample_size = request.judge.sample_size
    return message


def evaluation_from_proto(result: common_pb2.EvaluationResult) -> Evaluation:
    """EvaluationResult -> Evaluation: the objective, figures for logs, the whole document."""
    figures: dict[str, float] = {}
    if result.HasField("classification"):
        c = result.classification
        figures |= {"f1_macro": c.f1_macro, "f1_micro": c.f1_micro, "accuracy": c.accuracy}
    if result.HasField("bertscore"):
        figures |= {"bertscore_f1": result.bertscore.f1, "combined": result.combined_score}
    if result.HasField("judge"):
        figures["judge_mean"] = result.judge.mean_score
        figures["judge_coverage"] = result.judge.coverage
    return Evaluation(
        objective=result.objective,
        objective_name=result.objective_name,
        figures=figures,
        document=evaluation_document(result),
    )


def evaluation_document(result: common_pb2.EvaluationResult) -> dict[str, Any]:
    """EvaluationResult -> its JSON document (json_format's names), the confusion matrix's
    counts copied as one list rather than converted one value at a time."""
    if not result.classification.confusion_matrix.counts:
        return json_format.MessageToDict(result)
    matrix = result.classification.confusion_matrix
    labels, counts = list(matrix.labels), list(matrix.counts)
    light = common_pb2.EvaluationResult()
    light.CopyFrom(result)
    light.classification.ClearField("confusion_matrix")
    document = json_format.MessageToDict(light)
    document["classification"]["confusionMatrix"] = {"labels": labels, "counts": counts}
    return document
