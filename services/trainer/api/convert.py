"""Conversion between the trainer's protos and its domain types."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from loratune.common.v1 import common_pb2
from loratune.trainer.v1 import trainer_pb2
from services.common.defaults import TrainingDefaults
from services.common.errors import InvalidArgument
from services.common.names import (
    MAX_PATH_LENGTH,
    ensure_under,
    escape_control,
    excerpt,
    validate_name,
)
from services.trainer.core.jobs import EventRecord, Job, JobState, TrainerStatus
from services.trainer.core.types import (
    BalancingSpec,
    BaseModelFormat,
    BaseModelInfo,
    CompletedEvent,
    DatasetPreparedEvent,
    DatasetSpec,
    EvaluationEvent,
    FailedEvent,
    FailureReason,
    JobSpec,
    LoraSpec,
    ProgressEvent,
    Task,
    TrainingSpec,
)

# A job id becomes a folder name (<artifact_root>/<job_id>). Room for a 128-character
# study name with the optimizer's "-t<trial>-a<attempt>" after it, well under 255 bytes.
MAX_JOB_ID_LENGTH = 200

_TASKS = {
    common_pb2.TASK_TYPE_CLASSIFICATION: Task.CLASSIFICATION,
    common_pb2.TASK_TYPE_GENERATION: Task.GENERATION,
}
_STATES = {
    JobState.PENDING: trainer_pb2.JOB_STATE_PENDING,
    JobState.RUNNING: trainer_pb2.JOB_STATE_RUNNING,
    JobState.COMPLETED: trainer_pb2.JOB_STATE_COMPLETED,
    JobState.FAILED: trainer_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: trainer_pb2.JOB_STATE_CANCELLED,
}
_REASONS = {
    FailureReason.OUT_OF_MEMORY: trainer_pb2.FAILURE_REASON_OUT_OF_MEMORY,
    FailureReason.NAN_LOSS: trainer_pb2.FAILURE_REASON_NAN_LOSS,
    FailureReason.INVALID_INPUT: trainer_pb2.FAILURE_REASON_INVALID_INPUT,
    FailureReason.CANCELLED: trainer_pb2.FAILURE_REASON_CANCELLED,
    FailureReason.INTERNAL: trainer_pb2.FAILURE_REASON_INTERNAL,
    FailureReason.SHUTDOWN: trainer_pb2.FAILURE_REASON_SHUTDOWN,
}
_BASE_FORMATS = {
    BaseModelFormat.TRANSFORMERS: trainer_pb2.BASE_MODEL_FORMAT_TRANSFORMERS,
    BaseModelFormat.GGUF: trainer_pb2.BASE_MODEL_FORMAT_GGUF,
}


def dataset_from_proto(dataset: common_pb2.DatasetSpec) -> DatasetSpec:
    """The domain dataset spec with the contract's defaults for empty fields."""
    task = _TASKS.get(dataset.task_type)
    if task is None:
        raise InvalidArgument(
            "must be TASK_TYPE_CLASSIFICATION or TASK_TYPE_GENERATION", field="dataset.task_type"
        )
    return DatasetSpec(
        uri=dataset.uri,
        task=task,
        format=dataset.format.lower(),
        text_field=dataset.text_field or "text",
        label_field=dataset.label_field or "label",
        prompt_field=dataset.prompt_field or "prompt",
        target_field=dataset.target_field or "response",
        validation_uri=dataset.validation_uri,
        validation_fraction=dataset.validation_fraction or 0.1,
        seed=dataset.seed,
    )


def job_id_from_proto(job_id: str) -> str:
    """The request's job id when it is a safe name (``validate_name``), else INVALID_ARGUMENT."""
    return validate_name(job_id, "job_id", max_length=MAX_JOB_ID_LENGTH)


def output_dir_from_proto(output_dir: str, job_id: str, artifact_root: Path) -> str:
    """Where the job writes: ``output_dir`` inside ``artifact_root``, or ``<root>/<job_id>``.

    A relative ``output_dir`` is taken relative to the artifact root; one that resolves
    outside it (``/etc/x``, ``../..``, a symbolic link out) is INVALID_ARGUMENT.
    """
    if not output_dir:
        return str(artifact_root / job_id)
    return str(ensure_under(artifact_root, Path(output_dir), "output_dir"))


def _base_model_from_proto(base_model: str) -> str:
    """The base model name or path, refused when it is too long or has control characters."""
    if len(base_model) > MAX_PATH_LENGTH:
        raise InvalidArgument(
            f"must be at most {MAX_PATH_LENGTH} characters, got {len(base_model)}",
            field="base_model",
        )
    if escape_control(base_model) != base_model:
        raise InvalidArgument(
            f'must not contain control characters, got "{excerpt(base_model)}"',
            field="base_model",
        )
    return base_model


def job_from_proto(
    request: trainer_pb2.StartTrainingRequest, defaults: TrainingDefaults, artifact_root: Path
) -> JobSpec:
    """A StartTrainingRequest as a JobSpec; fields the contract lets callers omit get defaults.

    Required numbers (rank, alpha, learning rate, epochs, batch size) are taken as sent,
    so that 0 is rejected by validation rather than silently replaced. The job id must
    be a safe name and the output folder must lie inside ``artifact_root``.
    """
    job_id = job_id_from_proto(request.job_id)
    hp = request.hyperparameters
    lora, training, balancing = hp.lora, hp.training, hp.balancing
    return JobSpec(
        job_id=job_id,
        base_model=_base_model_from_proto(request.base_model),
        dataset=dataset_from_proto(request.dataset),
        lora=LoraSpec(
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=tuple(lora.target_modules),
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
        ),
        training=TrainingSpec(
            learning_rate=training.learning_rate,
            num_epochs=training.num_epochs,
            batch_size=training.batch_size,
            gradient_accumulation=training.gradient_accumulation or defaults.gradient_accumulation,
            max_seq_length=training.max_seq_length or defaults.max_seq_length,
            warmup_ratio=training.warmup_ratio,
            weight_decay=training.weight_decay,
            quantize_4bit=training.quantize_4bit,
            seed=training.seed,
            probe_only=training.probe_only,
        ),
        balancing=BalancingSpec(
            focal_gamma=(
                balancing.focal_gamma
                if balancing.HasField("focal_gamma")
                else defaults.focal_loss_gamma
            ),
            use_class_weights=(
                balancing.use_class_weights
                if balancing.HasField("use_class_weights")
                else defaults.use_class_weights
            ),
            use_weighted_sampler=(
                balancing.use_weighted_sampler
                if balancing.HasField("use_weighted_sampler")
                else defaults.use_weighted_sampler
            ),
            min_samples_per_class=(
                balancing.min_samples_per_class or defaults.min_samples_per_class
            ),
            posthoc_logit_adjustment=balancing.posthoc_logit_adjustment,
            logit_adjust_tau=balancing.logit_adjust_tau,
            sampler_power=balancing.sampler_power,
            two_stage=balancing.two_stage,
            group_separator=balancing.group_separator,
        ),
        output_dir=output_dir_from_proto(request.output_dir, job_id, artifact_root),
        max_eval_samples=request.max_eval_samples,
        max_new_tokens=request.max_new_tokens or 128,
    )


def _timestamp(value: object) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


def job_to_proto(job: Job) -> trainer_pb2.TrainingJob:
    """The contract's TrainingJob."""
    return trainer_pb2.TrainingJob(
        job_id=job.spec.job_id,
        state=_STATES[job.state],
        base_model=job.spec.base_model,
        output_dir=job.spec.output_dir,
        create_time=_timestamp(job.create_time),
    )


def event_to_proto(job_id: str, record: EventRecord) -> trainer_pb2.TrainingEvent:
    """One event of the job's log as a TrainingEvent."""
    out = trainer_pb2.TrainingEvent(
        job_id=job_id, sequence=record.sequence, time=_timestamp(record.time)
    )
    event = record.event
    if isinstance(event, ProgressEvent):
        out.progress.CopyFrom(
            trainer_pb2.Progress(
                epoch=event.epoch,
                step=event.step,
                total_steps=event.total_steps,
                loss=event.loss,
                learning_rate=event.learning_rate,
                samples_per_second=event.samples_per_second,
            )
        )
    elif isinstance(event, EvaluationEvent):
        out.evaluation.CopyFrom(
            trainer_pb2.EvaluationPoint(
                epoch=event.epoch,
                step=event.step,
                eval_loss=event.eval_loss,
                predictions=event.predictions,
                references=event.references,
                prompts=event.prompts,
                labels=event.labels,
                adapter_dir=event.adapter_dir,
                posthoc_tau=event.posthoc_tau,
            )
        )
    elif isinstance(event, DatasetPreparedEvent):
        out.dataset_prepared.CopyFrom(
            trainer_pb2.DatasetPrepared(
                train_rows=event.train_rows,
                validation_rows=event.validation_rows,
                excluded_classes=event.excluded_classes,
                labels=event.labels,
                excluded=[
                    common_pb2.ExcludedClass(
                        label=label, train_rows=rows[0], validation_rows=rows[1]
                    )
                    for label, rows in event.excluded_rows.items()
                ],
            )
        )
    elif isinstance(event, CompletedEvent):
        out.completed.CopyFrom(
            trainer_pb2.Completed(
                artifact_dir=event.artifact_dir, train_seconds=event.train_seconds
            )
        )
    elif isinstance(event, FailedEvent):
        out.failed.CopyFrom(
            trainer_pb2.Failed(reason=_REASONS[event.reason], message=event.message)
        )
    return out


def status_to_proto(status: TrainerStatus) -> trainer_pb2.GetTrainerStatusResponse:
    """The contract's GetTrainerStatusResponse."""
    return trainer_pb2.GetTrainerStatusResponse(
        device=status.device,
        device_name=status.device_name,
        busy=status.busy,
        current_job_id=status.current_job_id,
        loaded_base_model=status.loaded_base_model,
        memory_allocated_bytes=status.memory_allocated_bytes,
        memory_reserved_bytes=status.memory_reserved_bytes,
        memory_total_bytes=status.memory_total_bytes,
        shutting_down=status.shutting_down,
        loaded_base=_loaded_base_to_proto(status.loaded_base),
    )


def _loaded_base_to_proto(info: BaseModelInfo | None) -> trainer_pb2.LoadedBaseModel | None:
    if info is None:
        return None
    return trainer_pb2.LoadedBaseModel(
        name=info.name,
        format=_BASE_FORMATS[info.format],
        gguf_file=info.gguf_file,
        gguf_folder=info.gguf_folder,
        gguf_quantization_type=info.gguf_quantization_type,
        dequantized=info.dequantized,
        quantized_4bit=info.quantize_4bit,
        dtype=info.dtype,
    )
