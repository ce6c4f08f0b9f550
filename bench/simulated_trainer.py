"""A trainer whose compute is simulated: the real TrainerService, job manager and data
preparation, with a runner that sleeps through its steps instead of training.

For measuring the control plane (optimizer, storage, evaluator, console) at a team's scale
without GPUs: each job reads and splits its dataset as a real one does, reports progress
every few steps at `step_seconds` a step, and at each epoch's end emits the validation
predictions a classifier of that quality would (every row, over the real label set), then
saves a small adapter folder (the files a real one has, a few bytes each) and its
validation log-probabilities. Its quality is a fixed function of the learning rate and the
epoch, so the optimizer's sampler and pruner have something to learn.

    from simulated_trainer import start_simulated_trainer
    server = await start_simulated_trainer(root, step_seconds=0.01)
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, start_server
from services.trainer.config import TrainerSettings
from services.trainer.core.data import prepare
from services.trainer.core.jobs import JobManager
from services.trainer.core.types import (
    Cancelled,
    CompletedEvent,
    DatasetPreparedEvent,
    EvaluationEvent,
    FailureReason,
    JobSpec,
    PreparedData,
    ProgressEvent,
    RunContext,
)
from services.trainer.main import service_definition

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_config.json")


@dataclass(frozen=True)
class Pace:
    """How fast a simulated job goes."""

    step_seconds: float = 0.01
    steps_per_epoch: int = 20


def quality(learning_rate: float, epoch: int, epochs: int) -> float:
    """The share of validation rows a job gets right: best near lr 3e-4, rising by epoch."""
    closeness = math.exp(-((math.log10(max(learning_rate, 1e-8)) + 3.5) ** 2))
    return 0.35 + 0.55 * closeness * (0.6 + 0.4 * epoch / max(epochs, 1))


class SimulatedRunner:
    """The JobRunner protocol, with time instead of compute."""

    def __init__(self, pace: Pace) -> None:
        self._pace = pace

    def validate(self, spec: JobSpec) -> PreparedData:
        return prepare(spec.dataset, spec.balancing.min_samples_per_class)

    def run(self, spec: JobSpec, prepared: Any, ctx: RunContext) -> CompletedEvent:
        data: PreparedData = prepared
        started = time.perf_counter()
        labels = list(data.labels)
        index = {label: i for i, label in enumerate(labels)}
        references = [example.label for example in data.validation]
        ctx.emit(
            DatasetPreparedEvent(
                train_rows=len(data.train),
                validation_rows=len(data.validation),
                excluded_classes=[],
                labels=labels,
            )
        )
        epochs = max(spec.training.num_epochs, 1)
        steps = self._pace.steps_per_epoch
        rng = random.Random(f"{spec.job_id}:{spec.training.seed}")
        out = Path(spec.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for epoch in range(1, epochs + 1):
            for step in range(1, steps + 1):
                if ctx.should_stop():
                    raise Cancelled("stopped")
                time.sleep(self._pace.step_seconds)
                done = (epoch - 1) * steps + step
                if done % max(ctx.progress_every_steps, 1) == 0:
                    ctx.emit(
                        ProgressEvent(
                            epoch=epoch - 1 + step / steps,
                            step=done,
                            total_steps=epochs * steps,
                            loss=1.0 / done,
                            learning_rate=spec.training.learning_rate,
                            samples_per_second=spec.training.batch_size / self._pace.step_seconds,
                        )
                    )
            right = quality(spec.training.learning_rate, epoch, epochs)
            predictions = [
                ref if rng.random() < right else labels[rng.randrange(len(labels))]
                for ref in references
            ]
            scores = _log_probs(predictions, index)
            ctx.emit(
                EvaluationEvent(
                    epoch=float(epoch),
                    step=epoch * steps,
                    eval_loss=1.0 - right,
                    predictions=predictions,
                    references=references,
                    labels=labels,
                    adapter_dir=str(out),
                    scores=scores,
                )
            )
        for name in ADAPTER_FILES:
            (out / name).write_text(json.dumps({"simulated": spec.job_id}))
        return CompletedEvent(artifact_dir=str(out), train_seconds=time.perf_counter() - started)

    def failure_of(self, error: BaseException) -> FailureReason:
        return FailureReason.INTERNAL

    def healthy(self) -> bool:
        return True

    def device_status(self) -> dict[str, Any]:
        return {
            "device": "simulated",
            "device_name": "simulated",
            "loaded_base_model": "",
            "loaded_base": None,
            "memory_allocated_bytes": 0,
            "memory_reserved_bytes": 0,
            "memory_total_bytes": 0,
        }


def _log_probs(predictions: list[str], index: dict[str, int]) -> Any:
    """One-hot-ish log-probabilities of the predictions (the scores a trial saves), as a
    float16 torch tensor when torch is there, else None."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the bench's environment has torch
        return None
    rows, classes = len(predictions), len(index)
    if rows * classes > 4_000_000:
        return None
    probs = np.full((rows, classes), 0.1 / max(classes - 1, 1), dtype=np.float32)
    probs[np.arange(rows), [index[p] for p in predictions]] = 0.9
    return torch.from_numpy(np.log(probs)).half()


async def start_simulated_trainer(
    root: Path,
    pace: Pace | None = None,
    host: str = "127.0.0.1",
    runner: SimulatedRunner | None = None,
) -> RunningServer:
    """A TrainerService on a free port whose jobs are simulated at `pace` (or by `runner`)."""
    settings = TrainerSettings(artifact_root=root, trainer_progress_every_steps=5)
    manager = JobManager(
        runner or SimulatedRunner(pace or Pace()),
        jobs_kept=settings.trainer_jobs_kept,
        progress_every_steps=settings.trainer_progress_every_steps,
    )
    return await start_server(
        [service_definition(manager, settings, TrainingDefaults())],
        CommonSettings(),
        host=host,
        metrics_port=None,
    )
