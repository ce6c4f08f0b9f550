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
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.optimizer.clients import StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.ports import JudgeModel


class FakeTrainers:
    """Runs each job as a list of events: objective per epoch from the learning rate."""

    def __init__(self, epochs: int = 3) -> None:
        self.epochs = epochs
        self.jobs: dict[str, trainer_pb2.StartTrainingRequest] = {}
        self.cancelled: list[str] = []
        self.fail_with: dict[int, trainer_pb2.Failed] = {}  # trial number -> failure
        self.lose: set[int] = set()  # trial numbers whose trainer disappears
        self.curve: list[float] | None = None  # objective per epoch for every trial
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
            if self.curve is not None:
                score = self.curve[epoch - 1]
            # As the trainer does: earlier epochs' adapters under epochs/, the last in the root.
            folder = Path(request.output_dir)
            if epoch < self.epochs:
                folder = folder / "epochs" / f"epoch-{epoch}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_model.safetensors").write_text(f"epoch {epoch}")
            yield trainer_pb2.TrainingEvent(
                evaluation=trainer_pb2.EvaluationPoint(
                    epoch=epoch,
                    predictions=[f"{score}"],
                    references=["x"],
                    labels=["x"],
                    adapter_dir=str(folder),
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
    async def models(self) -> list[JudgeModel]:
        return [JudgeModel("gemini", True, is_default=True), JudgeModel("gigachat", False)]


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


async def test_a_trial_keeps_its_best_epoch_not_its_last(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=3)
    trainers.curve = [0.5, 0.9, 0.7]
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    trials = optimizer.list_trials(study.study_id)
    for trial in trials:
        assert trial.objective == pytest.approx(0.9) and trial.best_epoch == 2
        assert list(trial.epoch_objectives) == pytest.approx([0.5, 0.9, 0.7])
        folder = Path(trial.artifact_dir)
        assert (folder / "adapter_model.safetensors").read_text() == "epoch 2"
        assert not (folder / "epochs").exists()
        assert trial.evaluation.objective == pytest.approx(0.9)
        curve = json.loads((folder / "evaluation_curve.json").read_text())
        assert [e["objective"] for e in curve["epochs"]] == pytest.approx([0.5, 0.9, 0.7])
    published = Path(study.best_model_dir)
    assert (published / "adapter_model.safetensors").read_text() == "epoch 2"
    assert json.loads((published / "evaluation_results.json").read_text())["objective"] == 0.9


async def test_evaluator_unavailable_is_retried_keeping_predictions(
    tmp_path: Path, data: Path
) -> None:
    evaluator = FakeEvaluator()
    evaluator.unavailable = 2
    optimizer = make(tmp_path, FakeTrainers(epochs=1), evaluator)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert evaluator.calls == 5 + 2


async def test_a_lost_trainer_runs_the_same_trial_again_uncounted(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.lose = {1}
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none"))
    trials = optimizer.list_trials(study.study_id)
    assert study.trials_complete == 5 and study.trials_failed == 0 and len(trials) == 5
    again = trials[1]
    assert again.attempt == 2 and again.state == optimizer_pb2.TRIAL_STATE_COMPLETE
    assert len(again.interruptions) == 1 and "lost" in again.interruptions[0]
    jobs = [trainers.jobs[j] for j in ("s-t1-a1", "s-t1-a2")]
    assert jobs[0].hyperparameters == jobs[1].hyperparameters == again.hyperparameters
    assert jobs[0].output_dir == jobs[1].output_dir == again.artifact_dir


async def test_a_trainer_shutting_down_costs_no_failure(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=2)
    shutdown = trainer_pb2.Failed(reason=trainer_pb2.FAILURE_REASON_SHUTDOWN, message="SIGTERM")
    trainers.fail_with = {0: shutdown, 2: shutdown}
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_failures=1)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    trials = optimizer.list_trials(study.study_id)
    assert study.trials_complete == 5 and study.trials_failed == 0 and len(trials) == 5
    assert [len(t.interruptions) for t in trials] == [1, 0, 1, 0, 0]
    assert "shut down" in trials[0].interruptions[0]


async def test_endless_interruptions_fail_the_trial_in_the_end(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    shutdown = trainer_pb2.Failed(reason=trainer_pb2.FAILURE_REASON_SHUTDOWN, message="SIGTERM")

    class Always(dict[int, trainer_pb2.Failed]):
        def pop(self, key: int, *default: Any) -> trainer_pb2.Failed:
            return shutdown

        def __contains__(self, key: object) -> bool:
            return key == 0

    trainers.fail_with = Always()
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_interruptions=2)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    trials = optimizer.list_trials(study.study_id)
    assert trials[0].state == optimizer_pb2.TRIAL_STATE_FAIL
    assert "interrupted 3 times" in trials[0].failure_reason
    assert study.trials_complete == 5


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


def _generation(request: optimizer_pb2.CreateStudyRequest, tmp_path: Path) -> None:
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    request.dataset.uri = str(path)
    request.dataset.task_type = common_pb2.TASK_TYPE_GENERATION
    request.fine_tuning_params.use_llm_judge = True


async def test_judge_is_checked_at_creation(tmp_path: Path, data: Path) -> None:
    optimizer = make(tmp_path, FakeTrainers(), FakeEvaluator())
    request = create(data)
    _generation(request, tmp_path)
    request.fine_tuning_params.judge_model_id = "claude"
    with pytest.raises(NotFound, match=r"LLM Judge model not found: 'claude' \(available: gemini"):
        await optimizer.create_study(request)
    # A judge the gateway knows but holds no credentials for fails now, not trials later.
    request.fine_tuning_params.judge_model_id = "gigachat"
    with pytest.raises(FailedPrecondition) as caught:
        await optimizer.create_study(request)
    assert caught.value.field == "fine_tuning_params.judge_model_id"
    assert "no credentials" in caught.value.message and "gemini" in caught.value.message
    request.fine_tuning_params.judge_model_id = ""  # the default, which has them
    study = await optimizer.create_study(request)
    assert study.state == optimizer_pb2.STUDY_STATE_QUEUED
    await optimizer.shutdown()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: setattr(r.dataset, "label_field", "code"), "dataset.label_field"),
        (lambda r: setattr(r.dataset, "text_field", "comment"), "dataset.text_field"),
        (lambda r: setattr(r.dataset, "validation_fraction", 1.5), "dataset.validation_fraction"),
        (lambda r: setattr(r.dataset, "validation_fraction", -0.1), "dataset.validation_fraction"),
        (lambda r: setattr(r.dataset, "format", "parquet"), "dataset.format"),
        (lambda r: setattr(r, "study_name", "../../etc"), "study_name"),
        (lambda r: setattr(r, "study_name", "/etc"), "study_name"),
        (lambda r: setattr(r, "study_name", "a\nb"), "study_name"),
        (lambda r: setattr(r, "study_name", "x" * 20_000), "study_name"),
    ],
)
async def test_what_can_be_checked_at_creation_is(
    tmp_path: Path, data: Path, change: Any, field: str
) -> None:
    optimizer = make(tmp_path / "root", FakeTrainers(), FakeEvaluator())
    request = create(data)
    change(request)
    with pytest.raises(InvalidArgument) as caught:
        await optimizer.create_study(request)
    assert caught.value.field == field
    assert len(caught.value.message) < 400  # never the whole 20,000 characters back
    assert "\n" not in caught.value.message
    assert not (tmp_path / "etc").exists() and not Path("/etc/trial-0").exists()


async def test_seed_json_request_parses(tmp_path: Path, data: Path) -> None:
    from google.protobuf import json_format

    seed = (
        '{"project_id": 123, "fine_tuning_params": {"use_llm_judge": true, '
        '"judge_model_id": "gemini", "base_model_name": "Qwen/Qwen3-0.6B", "n_trials": 20}}'
    )
    request = json_format.Parse(seed, optimizer_pb2.CreateStudyRequest())
    assert request.fine_tuning_params.n_trials == 20 and request.project_id == 123


SET_VARIABLES = {
    "LORA_NUM_EPOCHS": "1",
    "LORA_LEARNING_RATE": "0.003",
    "LORA_BATCH_SIZE": "8",
    "FOCAL_LOSS_GAMMA": "0.5",
    "USE_CLASS_WEIGHTS": "false",
    "USE_WEIGHTED_SAMPLER": "true",
    "GRADIENT_ACCUMULATION": "2",
    "MAX_SEQ_LENGTH": "64",
    "MIN_SAMPLES_PER_CLASS": "3",
}


def _held(trial: optimizer_pb2.Trial, epochs: set[int]) -> None:
    h = trial.hyperparameters
    assert h.training.num_epochs in epochs
    assert h.training.learning_rate == pytest.approx(0.003)
    assert h.training.batch_size == 8
    assert h.training.gradient_accumulation == 2 and h.training.max_seq_length == 64
    assert h.balancing.focal_gamma == pytest.approx(0.5)
    assert not h.balancing.use_class_weights and h.balancing.use_weighted_sampler
    assert h.balancing.min_samples_per_class == 3


async def test_variables_the_user_set_hold_for_every_trial(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SET_VARIABLES.items():
        monkeypatch.setenv(name, value)
    storage = optuna.storages.InMemoryStorage()

    def optimizer(trainers: FakeTrainers) -> Optimizer:
        return Optimizer(
            storage=storage,
            trainers=trainers,
            discovery=StaticTrainers(["127.0.0.1:1"]),
            evaluator=FakeEvaluator(),
            judges=FakeJudges(),
            defaults=TrainingDefaults(),  # read from the environment, as main.py does
            options=OptimizerOptions(artifact_root=tmp_path, poll_seconds=0.01),
        )

    study = await run(optimizer(FakeTrainers(epochs=1)), create(data, n=8, pruner="none"))
    trials = optimizer(FakeTrainers()).list_trials(study.study_id)
    assert len(trials) == 8
    for trial in trials:
        _held(trial, {1})
    # A dimension the request searches is the request's: epochs vary, the rest still hold.
    request = create(data, n=6, pruner="none", name="searched")
    request.search_space.num_epochs[:] = [2, 3]
    study = await run(optimizer(FakeTrainers(epochs=1)), request)
    trials = optimizer(FakeTrainers()).list_trials(study.study_id)
    assert {t.hyperparameters.training.num_epochs for t in trials} == {2, 3}
    for trial in trials:
        _held(trial, {2, 3})
    # What was set holds after a restart whose environment no longer sets it.
    trainers = FakeTrainers(epochs=1)
    first = optimizer(trainers)
    await first.create_study(create(data, n=6, pruner="none", name="restarted"))
    await first.shutdown()
    for name in SET_VARIABLES:
        monkeypatch.delenv(name)
    second = optimizer(trainers)
    await second.resume_all()
    async for _ in second.watch("restarted"):
        pass
    trials = second.list_trials("restarted")
    assert sum(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials) == 6
    for trial in trials:
        _held(trial, {1})
