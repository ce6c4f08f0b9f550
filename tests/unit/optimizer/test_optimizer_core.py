"""The optimizer core with fake trainers and a fake evaluator on Optuna's in-memory storage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from loratune.optimizer.v1 import optimizer_pb2
from loratune.trainer.v1 import trainer_pb2
from services.common.defaults import TrainingDefaults
from services.common.errors import NotFound, Unavailable
from services.optimizer.clients import StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions


class FakeTrainers:
    """Runs each job as a list of events: objective per epoch from the learning rate."""

    def __init__(self, epochs: int = 3) -> None:
        self.epochs = epochs
        self.jobs: dict[str, trainer_pb2.StartTrainingRequest] = {}
        self.cancelled: list[str] = []
        self.fail_with: dict[int, trainer_pb2.Failed] = {}  # trial number -> failure
        self.lose: set[int] = set()  # trial numbers whose trainer disappears
        self.started = 0

    async def start(self, address: str, request: trainer_pb2.StartTrainingRequest) -> None:
        self.jobs[request.job_id] = request
        self.started += 1

    async def watch(self, address: str, job_id: str) -> AsyncIterator[trainer_pb2.TrainingEvent]:
        request = self.jobs[job_id]
        number = int(job_id.split("-t")[1].split("-")[0])
        lr = request.hyperparameters.training.learning_rate
        for epoch in range(1, self.epochs + 1):
            await asyncio.sleep(0)
            if job_id in self.cancelled:
                yield trainer_pb2.TrainingEvent(
                    failed=trainer_pb2.Failed(reason=trainer_pb2.FAILURE_REASON_CANCELLED)
                )
                return
            if number in self.lose:
                self.lose.discard(number)
                raise Unavailable("trainer 127.0.0.1:1: connection reset")
            if number in self.fail_with:
                yield trainer_pb2.TrainingEvent(failed=self.fail_with.pop(number))
                return
            yield trainer_pb2.TrainingEvent(progress=trainer_pb2.Progress(epoch=epoch, step=epoch))
            # Higher learning rates score better here; the score rises with epochs.
            score = min(1.0, lr * 100 + 0.1 * epoch)
            yield trainer_pb2.TrainingEvent(
                evaluation=trainer_pb2.EvaluationPoint(
                    epoch=epoch, predictions=[f"{score}"], references=["x"], labels=["x"]
                )
            )
        yield trainer_pb2.TrainingEvent(completed=trainer_pb2.Completed(artifact_dir="/tmp"))

    async def cancel(self, address: str, job_id: str) -> None:
        self.cancelled.append(job_id)

    async def status(self, address: str) -> trainer_pb2.GetTrainerStatusResponse | None:
        return trainer_pb2.GetTrainerStatusResponse(device="cpu")


class FakeEvaluator:
    """Reads the objective the fake trainer put in the prediction."""

    def __init__(self) -> None:
        self.unavailable = 0
        self.calls = 0

    async def evaluate(self, request: evaluator_pb2.EvaluateRequest) -> common_pb2.EvaluationResult:
        self.calls += 1
        if self.unavailable:
            self.unavailable -= 1
            raise Unavailable("evaluator: connection refused")
        value = float(request.predictions[0])
        return common_pb2.EvaluationResult(
            task_type=request.task_type,
            objective=value,
            objective_name="f1_macro",
            classification=common_pb2.ClassificationMetrics(f1_macro=value),
        )


class FakeJudges:
    async def model_ids(self) -> list[str]:
        return ["gemini", "gigachat"]


def make(
    tmp_path: Path, trainers: FakeTrainers, evaluator: FakeEvaluator, **options: Any
) -> Optimizer:
    return Optimizer(
        storage=optuna.storages.InMemoryStorage(),
        trainers=trainers,
        discovery=StaticTrainers(["127.0.0.1:1"]),
        evaluator=evaluator,
        judges=FakeJudges(),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(artifact_root=tmp_path, poll_seconds=0.01, **options),
        architecture_of=lambda name: "decoder",
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "b"}) + "\n")
    return path


def create(data: Path, n: int = 6, **kw: Any) -> optimizer_pb2.CreateStudyRequest:
    return optimizer_pb2.CreateStudyRequest(
        project_id=1,
        study_name=kw.pop("name", "s"),
        fine_tuning_params=optimizer_pb2.FineTuningParams(base_model_name="org/model", n_trials=n),
        dataset=common_pb2.DatasetSpec(
            uri=str(data), task_type=common_pb2.TASK_TYPE_CLASSIFICATION
        ),
        **kw,
    )


async def run(
    optimizer: Optimizer, request: optimizer_pb2.CreateStudyRequest
) -> optimizer_pb2.Study:
    study = await optimizer.create_study(request)
    async for _ in optimizer.watch(study.study_id):
        pass
    return optimizer.get_study(study.study_id)


async def test_median_pruner_prunes_and_cancels_the_job(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=4)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=8, max_parallel_trials=1))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert study.trials_complete + study.trials_pruned == 8
    assert study.trials_pruned >= 1
    assert trainers.cancelled  # a pruned trial's job is cancelled at once
    trials = optimizer.list_trials(study.study_id)
    # The first trial runs the environment's defaults.
    assert trials[0].hyperparameters.training.learning_rate == pytest.approx(1e-4)
    assert trials[0].hyperparameters.lora.rank == 16


async def test_evaluator_unavailable_is_retried_keeping_predictions(
    tmp_path: Path, data: Path
) -> None:
    evaluator = FakeEvaluator()
    evaluator.unavailable = 2
    optimizer = make(tmp_path, FakeTrainers(epochs=1), evaluator)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert evaluator.calls == 5 + 2


async def test_trainer_loss_reenqueues_the_same_parameters(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.lose = {1}
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none"))
    trials = optimizer.list_trials(study.study_id)
    assert study.trials_complete == 5 and study.trials_failed == 1
    failed = next(t for t in trials if t.state == optimizer_pb2.TRIAL_STATE_FAIL)
    assert "trainer lost" in failed.failure_reason
    retry = next(t for t in trials if t.attempt == 2)
    assert retry.hyperparameters == failed.hyperparameters


async def test_out_of_memory_configuration_is_not_run_again(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.fail_with = {
        0: trainer_pb2.Failed(
            reason=trainer_pb2.FAILURE_REASON_OUT_OF_MEMORY, message="CUDA out of memory"
        )
    }
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED and study.trials_complete == 5
    trials = optimizer.list_trials(study.study_id)
    oom = trials[0]
    assert oom.state == optimizer_pb2.TRIAL_STATE_FAIL and "OUT_OF_MEMORY" in oom.failure_reason
    again = [
        t
        for t in trials[1:]
        if t.hyperparameters == oom.hyperparameters
        and t.state == optimizer_pb2.TRIAL_STATE_COMPLETE
    ]
    assert not again


async def test_too_many_failures_end_the_study_failed(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.fail_with = {
        n: trainer_pb2.Failed(reason=trainer_pb2.FAILURE_REASON_NAN_LOSS, message="loss is nan")
        for n in range(20)
    }
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_failures=3)
    study = await run(optimizer, create(data, n=5))
    assert study.state == optimizer_pb2.STUDY_STATE_FAILED
    assert "3 trials failed" in study.failure_reason and "NAN_LOSS" in study.failure_reason


async def test_judge_is_checked_at_creation(tmp_path: Path, data: Path) -> None:
    optimizer = make(tmp_path, FakeTrainers(), FakeEvaluator())
    request = create(data)
    request.dataset.task_type = common_pb2.TASK_TYPE_GENERATION
    request.fine_tuning_params.use_llm_judge = True
    request.fine_tuning_params.judge_model_id = "claude"
    with pytest.raises(NotFound, match=r"LLM Judge model not found: 'claude' \(available: gemini"):
        await optimizer.create_study(request)


async def test_seed_json_request_parses(tmp_path: Path, data: Path) -> None:
    from google.protobuf import json_format

    seed = (
        '{"project_id": 123, "fine_tuning_params": {"use_llm_judge": true, '
        '"judge_model_id": "gemini", "base_model_name": "Qwen/Qwen3-0.6B", "n_trials": 20}}'
    )
    request = json_format.Parse(seed, optimizer_pb2.CreateStudyRequest())
    assert request.fine_tuning_params.n_trials == 20 and request.project_id == 123
