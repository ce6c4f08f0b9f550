"""The work behind a job on this machine: validate, load, tokenise, train, save."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from services.trainer import metrics
from services.trainer.core.artifacts import (
    TensorBoardLogger,
    check_output_dir,
    epoch_dir,
    save_artifacts,
)
from services.trainer.core.data import prepare
from services.trainer.core.loop import LoopResult, train
from services.trainer.core.models import (
    BaseModelCache,
    check_base_model,
    cuda_broken,
    device_info,
    free_accelerator_memory,
)
from services.trainer.core.probe import ProbeFeatureCache
from services.trainer.core.tokenize import TokenizationCache
from services.trainer.core.types import (
    DEFAULT_LOOP_OPTIONS,
    CompletedEvent,
    DatasetPreparedEvent,
    EvaluationEvent,
    Event,
    FailureReason,
    JobSpec,
    LoopOptions,
    PreparedData,
    ProgressEvent,
    RunContext,
)
from services.trainer.core.validation import validate_parameters

logger = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the accelerator (or the host) running out of memory."""
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class LocalRunner:
    """Runs jobs on this process's device; keeps the base model and tokenised data warm.

    `options` (the linear probe, the head-only phase, the head's learning rate) apply to
    every job it runs: the deployment decides them, not a request.
    """

    def __init__(
        self,
        tokenization_cache_entries: int = 8,
        device: str | None = None,
        options: LoopOptions = DEFAULT_LOOP_OPTIONS,
    ) -> None:
        self._options = options
        self._models = BaseModelCache(device, cpu_bf16=options.cpu_bf16)
        self._tokens = TokenizationCache(max(tokenization_cache_entries, 1))
        self._probe_features = ProbeFeatureCache(entries=2)

    @property
    def options(self) -> LoopOptions:
        """The training loop's options every job of this runner gets."""
        return self._options

    def validate(self, spec: JobSpec) -> PreparedData:
        """Parameters, output folder, base model, data and target modules, before acceptance."""
        validate_parameters(spec)
        check_output_dir(spec.output_dir)
        check_base_model(spec)
        return prepare(spec.dataset, spec.balancing.min_samples_per_class)

    def run(self, spec: JobSpec, prepared: Any, ctx: RunContext) -> CompletedEvent:
        """Loads (or reuses) the base, tokenises (or reuses), trains and saves the adapter."""
        data: PreparedData = prepared
        stats = data.stats
        ctx.emit(
            DatasetPreparedEvent(
                train_rows=len(data.train),
                validation_rows=len(data.validation),
                excluded_classes=sorted(stats.excluded) if stats else [],
                labels=list(data.labels),
                excluded_rows={
                    label: (stats.excluded.get(label, 0), stats.untrained_validation.get(label, 0))
                    for label in sorted({*stats.excluded, *stats.untrained_validation})
                }
                if stats
                else {},
            )
        )
        model = self._models.acquire(spec, data.labels)
        if not model.base_reused:
            metrics.MODEL_LOAD_SECONDS.observe(model.load_seconds)
            self._probe_features.clear()  # features of the old base must not outlive it
        hits = self._tokens.hits
        encoded = self._tokens.encode(
            data, model.tokenizer, model.tokenizer_id, spec.training.max_seq_length
        )
        if self._tokens.hits > hits:
            metrics.TOKENIZATION_CACHE_HITS.inc()
        else:
            metrics.TOKENIZATION_CACHE_MISSES.inc()
        logger.info(
            "job %s: %s base %s, %d trainable of %d parameters, %d train / %d validation rows",
            spec.job_id,
            "reused" if model.base_reused else f"loaded in {model.load_seconds:.1f} s",
            spec.base_model,
            model.trainable_parameters,
            model.total_parameters,
            len(encoded.train),
            len(encoded.validation),
        )
        out_dir = Path(spec.output_dir)
        started = time.perf_counter()

        def checkpoint(epoch: int, evaluation: EvaluationEvent) -> str:
            # The last epoch's adapter is the job's own folder, saved when the job completes.
            if epoch >= spec.training.num_epochs or spec.training.probe_only:
                return str(out_dir)
            so_far = LoopResult(
                train_seconds=time.perf_counter() - started,
                steps=evaluation.step,
                final_loss=float("nan"),
                last_eval=evaluation,
                samples_per_second=0.0,
            )
            return str(save_artifacts(model, data, spec, so_far, epoch_dir(out_dir, epoch)))

        with TensorBoardLogger(out_dir / "logs") as board:
            result = train(
                model,
                data,
                encoded,
                spec,
                _timed(ctx),
                scalar_logger=board,
                probe_cache=self._probe_features,
                checkpoint=checkpoint,
                options=self._options,
            )
        save_artifacts(model, data, spec, result, out_dir)
        return CompletedEvent(artifact_dir=str(out_dir), train_seconds=result.train_seconds)

    def failure_of(self, error: BaseException) -> FailureReason:
        """OUT_OF_MEMORY frees the cached model so the next job starts from a clean device."""
        if is_out_of_memory(error):
            self._models.release()
            self._probe_features.clear()
            free_accelerator_memory()
            return FailureReason.OUT_OF_MEMORY
        free_accelerator_memory()
        return FailureReason.INTERNAL

    def healthy(self) -> bool:
        """False once CUDA is in an error state only a new process can clear."""
        return not cuda_broken()

    def device_status(self) -> dict[str, Any]:
        """Device, loaded base model (its name, and what it was loaded from) and memory figures."""
        info = dict(device_info(self._models.device))
        info["loaded_base_model"] = self._models.loaded_base_model
        info["loaded_base"] = self._models.loaded_base
        return info

    def release(self) -> None:
        """Drops the cached base model (and the probe features computed on it)."""
        self._models.release()
        self._probe_features.clear()


def _timed(ctx: RunContext) -> RunContext:
    """`ctx` whose progress events also feed the step-time histogram."""
    last_time = [time.perf_counter()]
    last_step = [0]

    def emit(event: Event) -> None:
        if isinstance(event, ProgressEvent) and event.step > last_step[0]:
            now = time.perf_counter()
            steps = event.step - last_step[0]
            for _ in range(steps):
                metrics.STEP_SECONDS.observe((now - last_time[0]) / steps)
            last_time[0], last_step[0] = now, event.step
        ctx.emit(event)

    return RunContext(
        emit=emit,
        should_stop=ctx.should_stop,
        progress_every_steps=ctx.progress_every_steps,
        extra=ctx.extra,
    )
