"""The optimizer core with fake trainers and a fake evaluator on Optuna's in-memory storage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import optuna
import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2
from services.common.defaults import TrainingDefaults
from services.common.ensembles import ENSEMBLE_FILE, SCORES_KEY, VALIDATION_SCORES_FILE
from services.common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.optimizer.api.convert import (
    evaluation_from_proto,
    event_to_proto,
    hyperparameters_to_proto,
    study_request_from_proto,
    study_to_proto,
    trial_to_proto,
)
from services.optimizer.clients import StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.ports import (
    Evaluation,
    EvaluationRequest,
    JobCompleted,
    JobEvaluation,
    JobEvent,
    JobFailed,
    JobProgress,
    JudgeModel,
    TrainerState,
    TrainingJob,
)


class FakeTrainers:
    """Runs each job as a list of events: objective per epoch from the learning rate."""

    def __init__(self, epochs: int = 3) -> None:
        self.epochs = epochs
        self.jobs: dict[str, TrainingJob] = {}
        self.cancelled: list[str] = []
        self.fail_with: dict[int, JobFailed] = {}  # trial number -> failure
        self.lose: set[int] = set()  # trial numbers whose trainer disappears
        self.curve: list[float] | None = None  # objective per epoch for every trial
        self.started = 0

    async def start(self, address: str, request: TrainingJob) -> None:
        self.jobs[request.job_id] = request
        self.started += 1

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        if job_id not in self.jobs:  # as a restarted trainer answers
            raise NotFound(f"no job '{job_id}' on this trainer (it may have restarted)")
        request = self.jobs[job_id]
        number = int(job_id.split("-t")[1].split("-")[0])
        lr = request.hyperparameters.learning_rate
        for epoch in range(1, self.epochs + 1):
            await asyncio.sleep(0)
            if job_id in self.cancelled:
                yield JobFailed("CANCELLED", "cancelled by a client")
                return
            if number in self.lose:
                self.lose.discard(number)
                raise Unavailable("trainer 127.0.0.1:1: connection reset")
            if number in self.fail_with:
                yield self.fail_with.pop(number)
                return
            yield JobProgress(epoch=epoch, step=epoch, total_steps=self.epochs, loss=1.0)
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
            yield JobEvaluation(
                epoch=epoch,
                step=epoch,
                eval_loss=1.0,
                predictions=[f"{score}"],
                references=["x"],
                labels=["x"],
                adapter_dir=str(folder),
            )
        yield JobCompleted(artifact_dir="/tmp")

    async def cancel(self, address: str, job_id: str) -> None:
        self.cancelled.append(job_id)

    async def status(self, address: str) -> TrainerState | None:
        return TrainerState(busy=False)


class FakeEvaluator:
    """Reads the objective the fake trainer put in the prediction."""

    def __init__(self) -> None:
        self.unavailable = 0
        self.calls = 0

    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        self.calls += 1
        if self.unavailable:
            self.unavailable -= 1
            raise Unavailable("evaluator: connection refused")
        value = float(request.predictions[0])
        return evaluation_from_proto(
            common_pb2.EvaluationResult(
                task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                objective=value,
                objective_name="f1_macro",
                classification=common_pb2.ClassificationMetrics(
                    f1_macro=value,
                    per_class=[common_pb2.ClassMetrics(label="x", f1=value, support=1)],
                    confusion_matrix=common_pb2.ConfusionMatrix(labels=["x"], counts=[1]),
                    worst_classes=["x"],
                ),
            )
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
    study = await create_with(optimizer, request)
    async for _ in optimizer.watch(study.study_id):
        pass
    return study_to_proto(await optimizer.get_study(study.study_id))


async def create_with(
    optimizer: Optimizer, request: optimizer_pb2.CreateStudyRequest
) -> optimizer_pb2.Study:
    """CreateStudy as the servicer does it: the message in, the message out."""
    return study_to_proto(await optimizer.create_study(study_request_from_proto(request)))


async def trials_of(optimizer: Optimizer, study_id: str) -> list[optimizer_pb2.Trial]:
    return [trial_to_proto(t) for t in await optimizer.list_trials(study_id)]


async def test_median_pruner_prunes_and_cancels_the_job(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=4)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=8, max_parallel_trials=1))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert study.trials_complete + study.trials_pruned == 8
    assert study.trials_pruned >= 1
    assert trainers.cancelled  # a pruned trial's job is cancelled at once
    trials = await trials_of(optimizer, study.study_id)
    # The first trial runs the environment's defaults.
    assert trials[0].hyperparameters.training.learning_rate == pytest.approx(1e-4)
    assert trials[0].hyperparameters.lora.rank == 16


async def test_a_trial_keeps_its_best_epoch_not_its_last(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=3)
    trainers.curve = [0.5, 0.9, 0.7]
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    trials = await trials_of(optimizer, study.study_id)
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
    trials = await trials_of(optimizer, study.study_id)
    assert study.trials_complete == 5 and study.trials_failed == 0 and len(trials) == 5
    again = trials[1]
    assert again.attempt == 2 and again.state == optimizer_pb2.TRIAL_STATE_COMPLETE
    assert len(again.interruptions) == 1 and "lost" in again.interruptions[0]
    jobs = [trainers.jobs[j] for j in ("s-t1-a1", "s-t1-a2")]
    assert jobs[0].hyperparameters == jobs[1].hyperparameters
    assert hyperparameters_to_proto(jobs[0].hyperparameters) == again.hyperparameters
    assert jobs[0].output_dir == jobs[1].output_dir == again.artifact_dir


async def test_a_trainer_shutting_down_costs_no_failure(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=2)
    shutdown = JobFailed("SHUTDOWN", "SIGTERM")
    trainers.fail_with = {0: shutdown, 2: shutdown}
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_failures=1)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    trials = await trials_of(optimizer, study.study_id)
    assert study.trials_complete == 5 and study.trials_failed == 0 and len(trials) == 5
    assert [len(t.interruptions) for t in trials] == [1, 0, 1, 0, 0]
    assert "shut down" in trials[0].interruptions[0]


async def test_endless_interruptions_fail_the_trial_in_the_end(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    shutdown = JobFailed("SHUTDOWN", "SIGTERM")

    class Always(dict[int, JobFailed]):
        def pop(self, key: int, *default: Any) -> JobFailed:
            return shutdown

        def __contains__(self, key: object) -> bool:
            return key == 0

    trainers.fail_with = Always()
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_interruptions=2)
    study = await run(optimizer, create(data, n=5, pruner="none"))
    trials = await trials_of(optimizer, study.study_id)
    assert trials[0].state == optimizer_pb2.TRIAL_STATE_FAIL
    assert "interrupted 3 times" in trials[0].failure_reason
    assert study.trials_complete == 5


class OutOfMemoryAtRank4(FakeTrainers):
    """A trainer on which every rank-4 job runs out of memory at once."""

    def __init__(self) -> None:
        super().__init__(epochs=1)
        self.ranks: list[int] = []

    async def start(self, address: str, request: TrainingJob) -> None:
        await super().start(address, request)
        number = int(request.job_id.split("-t")[1].split("-")[0])
        self.ranks.append(request.hyperparameters.rank)
        if request.hyperparameters.rank == 4:
            self.fail_with[number] = JobFailed("OUT_OF_MEMORY", "CUDA out of memory")


async def test_out_of_memory_configuration_is_never_dispatched_again(
    tmp_path: Path, data: Path
) -> None:
    trainers = OutOfMemoryAtRank4()
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=5, pruner="none", sampler="random")
    # Two configurations only (every other dimension fixed), so the sampler proposes the
    # one that ran out of memory again and again: it must be skipped, not dispatched.
    request.search_space.CopyFrom(
        optimizer_pb2.SearchSpace(
            rank=[4, 8],
            alpha_multiplier=[2.0],
            dropout=optimizer_pb2.FloatRange(low=0.05, high=0.05),
            learning_rate=optimizer_pb2.FloatRange(low=1e-3, high=1e-3),
            num_epochs=[1],
            target_modules=[optimizer_pb2.TargetModulesChoice(name="all-linear")],
            use_rslora=[False],
            focal_gamma=optimizer_pb2.FloatRange(low=1.0, high=1.0),
            use_class_weights=[True],
            use_weighted_sampler=[False],
            two_stage=[False],
        )
    )
    study = await run(optimizer, request)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    # The one configuration that fits ran once; its repeats took its result.
    assert study.trials_complete == 1 and study.trials_reused >= 1
    assert trainers.ranks.count(8) == 1
    assert trainers.ranks.count(4) == 1  # the first OOM, and never again
    trials = await trials_of(optimizer, study.study_id)
    skipped = [t for t in trials if t.failure_reason.startswith("skipped")]
    assert skipped, "the sampler never proposed rank 4 again: the test proves nothing"
    assert all(t.hyperparameters.lora.rank == 0 for t in skipped)  # never built a job


async def test_too_many_failures_end_the_study_failed(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.fail_with = {n: JobFailed("NAN_LOSS", "loss is nan") for n in range(20)}
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
        await create_with(optimizer, request)
    # A judge the gateway knows but holds no credentials for fails now, not trials later.
    request.fine_tuning_params.judge_model_id = "gigachat"
    with pytest.raises(FailedPrecondition) as caught:
        await create_with(optimizer, request)
    assert caught.value.field == "fine_tuning_params.judge_model_id"
    assert "no credentials" in caught.value.message and "gemini" in caught.value.message
    request.fine_tuning_params.judge_model_id = ""  # the default, which has them
    study = await create_with(optimizer, request)
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
        await create_with(optimizer, request)
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
    trials = await trials_of(optimizer(FakeTrainers()), study.study_id)
    assert len(trials) == 8
    for trial in trials:
        _held(trial, {1})
    # A dimension the request searches is the request's: epochs vary, the rest still hold.
    request = create(data, n=6, pruner="none", name="searched")
    request.search_space.num_epochs[:] = [2, 3]
    study = await run(optimizer(FakeTrainers(epochs=1)), request)
    trials = await trials_of(optimizer(FakeTrainers()), study.study_id)
    assert {t.hyperparameters.training.num_epochs for t in trials} == {2, 3}
    for trial in trials:
        _held(trial, {2, 3})
    # What was set holds after a restart whose environment no longer sets it.
    trainers = FakeTrainers(epochs=1)
    first = optimizer(trainers)
    await create_with(first, create(data, n=6, pruner="none", name="restarted"))
    await first.shutdown()
    for name in SET_VARIABLES:
        monkeypatch.delenv(name)
    second = optimizer(trainers)
    await second.resume_all()
    async for _ in second.watch("restarted"):
        pass
    trials = await trials_of(second, "restarted")
    assert sum(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials) == 6
    for trial in trials:
        _held(trial, {1})


def _schema_1_storage(path: Path, data: Path, root: Path) -> optuna.storages.BaseStorage:
    """A SQLite storage as the previous version wrote it: the record is protobuf's JSON."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    request = {
        "projectId": "7",
        "studyName": "old",
        "fineTuningParams": {"baseModelName": "org/model", "nTrials": 5},
        "dataset": {"uri": str(data), "taskType": "TASK_TYPE_CLASSIFICATION", "seed": "3"},
        "searchSpace": {"rank": [4, 8], "numEpochs": [1]},
        "pruner": "none",
        "training": {"maxSeqLength": 48},
    }
    study.set_user_attr(
        "loratune",
        {
            "project_id": 7,
            "fine_tuning_params": {"baseModelName": "org/model", "nTrials": 5},
            "request": request,
            "fingerprint": "0" * 64,
            "state": "RUNNING",
            "create_time": "2026-11-30T10:00:00+00:00",
            "start_time": "2026-11-30T10:00:01+00:00",
            "objective_name": "f1_macro",
            "architecture": "decoder",
            "failures": 0,
            "oom_configs": [],
        },
    )
    old_hyper = {
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.05, "useRslora": True},
        "training": {"learningRate": 0.002, "numEpochs": 1, "batchSize": 4, "maxSeqLength": 48},
        "balancing": {"focalGamma": 1.5, "useClassWeights": True},
    }
    distributions = {
        "rank": optuna.distributions.CategoricalDistribution([4, 8]),
        "learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
    }
    for number in range(3):
        trial = study.ask(distributions)
        for name, value in (
            ("attempt", 1),
            ("job_id", f"old-t{number}-a1"),
            ("trainer", "127.0.0.1:1"),
            ("artifact_dir", str(root / "old" / f"trial-{number}")),
            ("hyperparameters", old_hyper),
        ):
            trial.set_user_attr(name, value)
        if number < 2:
            study.tell(trial, 0.5 + number / 10)  # two finished before the upgrade
    return storage  # trial 2 was left running by the old process


async def test_a_study_stored_by_the_previous_version_resumes(tmp_path: Path, data: Path) -> None:
    storage = _schema_1_storage(tmp_path / "optuna.db", data, tmp_path)
    trainers = FakeTrainers(epochs=1)  # knows no job of the old process: NOT_FOUND
    optimizer = Optimizer(
        storage=storage,
        trainers=trainers,
        discovery=StaticTrainers(["127.0.0.1:1"]),
        evaluator=FakeEvaluator(),
        judges=FakeJudges(),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(artifact_root=tmp_path, poll_seconds=0.01),
    )
    view = await optimizer.get_study("old")
    assert view.record.spec.fine_tuning.n_trials == 5
    assert view.record.spec.dataset.seed == 3 and view.record.spec.training.max_seq_length == 48
    assert view.record.spec.space.rank == (4, 8)
    await optimizer.resume_all()
    async for _ in optimizer.watch("old"):
        pass
    study = study_to_proto(await optimizer.get_study("old"))
    trials = await trials_of(optimizer, "old")
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert study.trials_complete == 5 and study.trials_failed == 0
    assert study.project_id == 7 and study.fine_tuning_params.base_model_name == "org/model"
    # The old trials' hyperparameters read back from protobuf's JSON.
    assert trials[0].hyperparameters.lora.use_rslora
    assert trials[0].hyperparameters.training.learning_rate == pytest.approx(0.002)
    # The trial the old process left running ran again (its job was gone), same number.
    assert trials[2].attempt == 2 and "lost" in trials[2].interruptions[0]
    assert trainers.jobs["old-t2-a2"].hyperparameters.rank == 4
    # Stored again in the current schema.
    stored = optuna.load_study(study_name="old", storage=storage).user_attrs["loratune"]
    assert stored["schema"] == 2 and stored["spec"]["dataset"]["task"] == "classification"


async def test_a_classification_study_evaluates_the_frozen_baseline_first(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none", name="base"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    first = trainers.jobs["base-t0-a1"].hyperparameters
    assert first.probe_only and first.num_epochs == 0
    second = trainers.jobs["base-t1-a1"].hyperparameters
    assert not second.probe_only and second.num_epochs == 3  # LORA_NUM_EPOCHS's default
    assert first.learning_rate == second.learning_rate  # the same point otherwise
    # A space without 0 epochs (the request's own) has no baseline trial.
    request = create(data, n=5, pruner="none", name="own")
    request.search_space.num_epochs[:] = [1, 2]
    await run(optimizer, request)
    assert not any(j.hyperparameters.probe_only for k, j in trainers.jobs.items() if "own" in k)
    # Generation has no head to probe.
    generation = create(data, n=5, name="gen")
    _generation(generation, tmp_path)
    generation.fine_tuning_params.use_llm_judge = False
    generation.search_space.num_epochs[:] = [0, 1]
    with pytest.raises(InvalidArgument) as caught:
        await create_with(optimizer, generation)
    assert caught.value.field == "search_space.num_epochs"


async def test_logit_adjustment_reaches_the_trainer_when_the_space_asks(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=5, pruner="none", name="la")
    request.search_space.posthoc_logit_adjustment[:] = [True]
    request.search_space.logit_adjust_tau.CopyFrom(optimizer_pb2.FloatRange(low=0.5, high=1.5))
    await run(optimizer, request)
    jobs = [j.hyperparameters for j in trainers.jobs.values()]
    assert all(h.posthoc_logit_adjustment for h in jobs)
    assert all(0.5 <= h.logit_adjust_tau <= 1.5 for h in jobs)
    message = hyperparameters_to_proto(jobs[0])
    assert message.balancing.posthoc_logit_adjustment
    assert message.balancing.logit_adjust_tau == pytest.approx(jobs[0].logit_adjust_tau)


async def test_a_group_separator_reaches_the_trainer_when_the_space_asks(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=5, pruner="none", name="groups")
    request.search_space.group_separator[:] = ["."]
    await run(optimizer, request)
    jobs = [j.hyperparameters for j in trainers.jobs.values()]
    assert jobs and all(h.group_separator == "." for h in jobs)
    message = hyperparameters_to_proto(jobs[0])
    assert message.balancing.group_separator == "."


async def test_a_probe_only_point_runs_once_and_its_repeats_cost_no_job(
    tmp_path: Path, data: Path
) -> None:
    # Only the frozen baseline is in the space: every later trial repeats it.
    trainers = FakeTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=5, pruner="none", name="once")
    request.search_space.num_epochs[:] = [0]
    study = await run(optimizer, request)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    trials = await trials_of(optimizer, "once")
    assert trainers.started == 1  # one job, for trial 0
    assert not trials[0].HasField("same_as")
    repeats = trials[1:]
    assert repeats and all(t.same_as == 0 for t in repeats)
    assert all(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials)
    assert {t.objective for t in trials} == {trials[0].objective}
    assert all(t.artifact_dir == trials[0].artifact_dir for t in repeats)
    # Repeats are free, but n_trials of them in a row mean the sampler has nothing new to
    # propose: the study ends. (Repeats proposed while trial 0 was still being recorded
    # waited for its result without holding the trainer; at most n_trials at once.)
    assert 1 + 5 <= len(trials) <= 1 + 2 * 5


async def test_the_floor_runs_once_outside_the_sampler(tmp_path: Path, data: Path) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.curve = [0.8]  # every trial as good as the floor: a sampler would return to it
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=8, pruner="none", name="mixed")
    request.search_space.num_epochs[:] = [0, 1]
    request.search_space.rank[:] = [4, 8]
    study = await run(optimizer, request)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    trials = await trials_of(optimizer, "mixed")
    ran = [t for t in trials if not t.HasField("same_as")]
    assert len(ran) == 8 == trainers.started
    probe_only = [t for t in trials if t.hyperparameters.training.probe_only]
    assert [t.number for t in probe_only] == [0]
    # The sampler was never offered the probe-only point: it cannot learn to repeat it.
    frozen = (await optimizer.store.study("mixed")).trials
    assert frozen[0].params == {}
    # Nor does the pruner see it: a frozen pass is no first epoch for trained trials to clear.
    assert frozen[0].intermediate_values == {} and frozen[0].value == 0.8
    assert all(t.intermediate_values for t in frozen[1:])
    assert all(
        0 not in t.distributions["num_epochs"].choices  # type: ignore[attr-defined]
        for t in frozen
        if "num_epochs" in t.distributions
    )


class SlowTrainers(FakeTrainers):
    """Each job takes `seconds` (real time) before its first event."""

    def __init__(self, seconds: float) -> None:
        super().__init__(epochs=1)
        self.seconds = seconds
        self.started_at: list[float] = []

    async def start(self, address: str, request: TrainingJob) -> None:
        self.started_at.append(asyncio.get_running_loop().time())
        await super().start(address, request)

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        await asyncio.sleep(self.seconds)
        async for event in super().watch(address, job_id):
            yield event


async def test_a_spent_time_budget_starts_no_trial_and_lets_the_running_one_finish(
    tmp_path: Path, data: Path
) -> None:
    trainers = SlowTrainers(0.4)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    request = create(data, n=50, pruner="none", name="budget")
    request.fine_tuning_params.time_budget_seconds = 1
    began = asyncio.get_running_loop().time()
    study = await run(optimizer, request)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert study.fine_tuning_params.time_budget_seconds == 1
    assert "time budget of 1s spent after" in study.end_note and "of 50 trials" in study.end_note
    trials = await trials_of(optimizer, "budget")
    assert 2 <= len(trials) < 50
    # Every trial it started finished (the last one after the budget ran out), none failed.
    assert all(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials)
    assert len([t for t in trials if not t.HasField("same_as")]) == trainers.started
    # None started after the budget (a poll period of slack for the last check).
    assert max(trainers.started_at) - began < 1.0 + 0.5
    assert study.best_model_dir


async def test_a_time_budget_beyond_30_days_is_refused(tmp_path: Path, data: Path) -> None:
    optimizer = make(tmp_path, FakeTrainers(), FakeEvaluator())
    request = create(data, name="long")
    request.fine_tuning_params.time_budget_seconds = 31 * 24 * 3600
    with pytest.raises(InvalidArgument) as caught:
        await create_with(optimizer, request)
    assert caught.value.field == "fine_tuning_params.time_budget_seconds"
    assert "30 days" in caught.value.message


class ClassifyingTrainers(FakeTrainers):
    """Predicts a 10-class validation split (10 rows each): the probe-only job right on
    `floor_accuracy` of each class's rows (the same rows every time), every other job right
    on each row with probability `accuracy` (its own random rows). Its saved log-probabilities
    are hesitant where wrong (the right class a close second), or with `sure_when_wrong`
    confident, so that averaging them with another trial's does not correct the error."""

    LABELS: ClassVar[list[str]] = [f"c{i}" for i in range(10)]

    def __init__(
        self, floor_accuracy: float, accuracy: float, *, sure_when_wrong: bool = False
    ) -> None:
        super().__init__(epochs=1)
        self.floor_accuracy, self.accuracy = floor_accuracy, accuracy
        self.sure_when_wrong = sure_when_wrong
        self.references = [label for label in self.LABELS for _ in range(10)]

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        import random

        request = self.jobs[job_id]
        number = int(job_id.split("-t")[1].split("-")[0])
        probe = request.hyperparameters.probe_only
        rng = random.Random(number)
        wrong = [self.LABELS[(self.LABELS.index(r) + 1) % 10] for r in self.references]
        if probe:
            predictions = [
                r if i % 10 < self.floor_accuracy * 10 else w
                for i, (r, w) in enumerate(zip(self.references, wrong, strict=True))
            ]
        else:
            predictions = [
                r if rng.random() < self.accuracy else w
                for r, w in zip(self.references, wrong, strict=True)
            ]
        folder = Path(request.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_text(f"trial {number}")
        self._save_scores(folder, predictions)
        yield JobEvaluation(
            epoch=1,
            step=1,
            eval_loss=1.0,
            predictions=predictions,
            references=self.references,
            labels=self.LABELS,
            adapter_dir=str(folder),
        )
        yield JobCompleted(artifact_dir=str(folder))

    def _save_scores(self, folder: Path, predictions: list[str]) -> None:
        """The trainer's validation log-probabilities: confident where right, and where
        wrong only just ahead of the right class."""
        import numpy as np
        from safetensors.numpy import save_file

        logits = np.zeros((len(predictions), len(self.LABELS)), dtype=np.float32)
        for row, (p, r) in enumerate(zip(predictions, self.references, strict=True)):
            logits[row, self.LABELS.index(r)] = 4.0 if p == r else 1.0
            if p != r:
                logits[row, self.LABELS.index(p)] = 12.0 if self.sure_when_wrong else 1.5
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        save_file({SCORES_KEY: log_probs.astype(np.float16)}, str(folder / VALIDATION_SCORES_FILE))


class MacroF1Evaluator(FakeEvaluator):
    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        from sklearn.metrics import f1_score

        value = float(
            f1_score(list(request.references), list(request.predictions), average="macro")
        )
        return evaluation_from_proto(
            common_pb2.EvaluationResult(
                task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                objective=value,
                objective_name="f1_macro",
                classification=common_pb2.ClassificationMetrics(f1_macro=value),
            )
        )


async def test_a_best_trial_within_the_noise_of_its_floor_is_not_published(
    tmp_path: Path, data: Path
) -> None:
    # Every trial as good as the floor: the best of them is ahead by chance alone. (Errors
    # made with confidence: no ensemble of them beats the floor either.)
    trainers = ClassifyingTrainers(0.8, 0.8, sure_when_wrong=True)
    optimizer = make(tmp_path, trainers, MacroF1Evaluator())
    study = await run(optimizer, create(data, n=12, pruner="none", name="noise"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    report = study.report
    assert report.floor_trial == 0 and report.default_trial == 1
    assert report.selected_trial != 0 and report.selected_objective > report.floor_objective
    assert report.HasField("noise") and report.noise > 0
    assert report.selected_objective - report.floor_objective <= report.expected_optimism
    assert report.published_trial == 0 and "the floor was published" in report.warning
    published = Path(study.best_model_dir)
    assert (published / "adapter_model.safetensors").read_text() == "trial 0"
    summary = json.loads((published / "study.json").read_text())
    assert summary["report"]["published_trial"] == 0 and summary["best_trial"] == 0
    # Each trial's validation predictions were kept for the measurement.
    trials = await trials_of(optimizer, "noise")
    assert (Path(trials[3].artifact_dir) / "validation_predictions" / "epoch-1.json").is_file()


async def test_a_clearly_better_trial_is_published_over_its_floor(
    tmp_path: Path, data: Path
) -> None:
    trainers = ClassifyingTrainers(0.5, 0.95, sure_when_wrong=True)  # no ensemble helps
    optimizer = make(tmp_path, trainers, MacroF1Evaluator())
    study = await run(optimizer, create(data, n=6, pruner="none", name="clear"))
    report = study.report
    assert report.floor_trial == 0 and report.published_trial == report.selected_trial != 0
    assert not report.warning
    assert report.selected_objective - report.floor_objective > report.expected_optimism
    published = Path(study.best_model_dir)
    assert (published / "adapter_model.safetensors").read_text() == f"trial {report.selected_trial}"


async def test_a_study_of_several_bases_runs_each_floor_first_and_searches_the_base(
    tmp_path: Path, data: Path
) -> None:
    trainers = ClassifyingTrainers(0.8, 0.8)
    optimizer = make(tmp_path, trainers, MacroF1Evaluator())
    request = create(data, n=8, pruner="none", name="bases")
    request.fine_tuning_params.base_model_name = "org/small"
    request.fine_tuning_params.base_model_names[:] = ["org/large", "org/small"]  # one repeat
    study = await run(optimizer, request)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert list(study.fine_tuning_params.base_model_names) == ["org/large"]
    trials = await trials_of(optimizer, "bases")
    # Each base's floor first, then the default trial on the first base.
    assert [(t.number, t.base_model) for t in trials[:3]] == [
        (0, "org/small"),
        (1, "org/large"),
        (2, "org/small"),
    ]
    assert trials[0].hyperparameters.training.probe_only
    assert trials[1].hyperparameters.training.probe_only
    jobs = {j.job_id: j for j in trainers.jobs.values()}
    for t in trials:
        assert t.base_model in ("org/small", "org/large")
        if not t.HasField("same_as"):
            assert jobs[f"bases-t{t.number}-a1"].base_model == t.base_model
    # Both floors reported; the floor to beat is the better of them.
    floors = {f.base_model: (f.trial, f.objective) for f in study.report.floors}
    assert set(floors) == {"org/small", "org/large"}
    assert study.report.floor_objective == max(v for _, v in floors.values())
    # A probe-only repeat takes the result of its own base's floor, never another base's.
    for t in trials:
        if t.HasField("same_as"):
            assert trials[t.same_as].base_model == t.base_model
    # The bases err on different rows: their best trials and the floors together predict
    # validation better than any alone, on held-out halves too, and the ensemble is what
    # was published.
    report = study.report
    assert {trials[n].base_model for n in report.ensemble_trials} == {"org/small", "org/large"}
    assert {f.trial for f in report.floors} <= set(report.ensemble_trials)
    assert report.ensemble_trials[0] == report.selected_trial
    assert report.ensemble_objective > report.selected_macro_f1
    assert report.ensemble_cross_validated > report.single_cross_validated
    assert report.ensemble_published and report.published_trial == report.ensemble_trials[0]
    published = Path(study.best_model_dir)
    manifest = json.loads((published / ENSEMBLE_FILE).read_text())
    assert manifest["trials"] == list(report.ensemble_trials)
    for name in manifest["members"]:
        assert (published / name / "adapter_model.safetensors").is_file()
    assert json.loads((published / "study.json").read_text())["report"]["ensemble_published"]


async def test_a_bad_extra_base_is_refused_naming_it(tmp_path: Path, data: Path) -> None:
    optimizer = make(tmp_path, FakeTrainers(), FakeEvaluator())
    request = create(data, name="bad-bases")
    request.fine_tuning_params.base_model_names[:] = ["org/ok", "org/\x1b[31mred"]
    with pytest.raises(InvalidArgument) as caught:
        await create_with(optimizer, request)
    assert caught.value.field == "fine_tuning_params.base_model_names[1]"
    request.fine_tuning_params.base_model_names[:] = [f"org/m{i}" for i in range(9)]
    with pytest.raises(InvalidArgument) as caught:
        await create_with(optimizer, request)
    assert "at most 7 more" in caught.value.message


class BrokenTrainers(FakeTrainers):
    """Answers StartTraining with `error`, or raises `crash` (not a LoratuneError) in watch."""

    def __init__(self, error: Exception | None = None, crash: Exception | None = None) -> None:
        super().__init__(epochs=1)
        self.error, self.crash = error, crash

    async def start(self, address: str, request: TrainingJob) -> None:
        self.started += 1
        if self.error is not None:
            raise self.error
        self.jobs[request.job_id] = request

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        if self.crash is not None:
            raise self.crash
        async for event in super().watch(address, job_id):
            yield event


@pytest.mark.parametrize(
    ("trainers", "words"),
    [
        (BrokenTrainers(error=Internal("internal error (TypeError)")), "could not start the job"),
        (BrokenTrainers(error=FailedPrecondition("not now")), "could not start the job"),
        (BrokenTrainers(crash=RuntimeError("a bug of ours")), "RuntimeError: a bug of ours"),
    ],
)
async def test_whatever_a_trainer_answers_every_trial_ends_and_the_study_ends(
    tmp_path: Path, data: Path, trainers: BrokenTrainers, words: str
) -> None:
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_failures=20)
    study = await asyncio.wait_for(run(optimizer, create(data, n=6, name="broken")), 60)
    assert study.state == optimizer_pb2.STUDY_STATE_FAILED
    trials = await trials_of(optimizer, "broken")
    # Never more trials than n_trials; none left RUNNING; each says why it failed.
    assert len(trials) == 6 == trainers.started
    assert all(t.state == optimizer_pb2.TRIAL_STATE_FAIL for t in trials)
    assert all(words in t.failure_reason for t in trials), trials[0].failure_reason
    assert "no trial completed" in study.failure_reason and words in study.failure_reason


async def test_an_internal_failure_that_repeats_on_the_retry_fails_the_study_at_once(
    tmp_path: Path, data: Path
) -> None:
    # The rule: INVALID_INPUT (data, a base that cannot load, a module set it lacks) ends the
    # study at once; INTERNAL runs the parameters again, and the same failure again on that
    # retry is no passing fault: the study fails with the trainer's words, not its budget.
    trainers = FakeTrainers(epochs=1)
    same = JobFailed("INTERNAL", "internal error (RuntimeError: size mismatch for classifier)")
    trainers.fail_with = {n: same for n in range(40)}
    optimizer = make(tmp_path, trainers, FakeEvaluator(), max_trial_failures=10)
    study = await run(optimizer, create(data, n=20, name="same"))
    assert study.state == optimizer_pb2.STUDY_STATE_FAILED
    assert "failed the same way on a retry" in study.failure_reason
    assert "size mismatch for classifier" in study.failure_reason
    # The queued first trials and one retry (the retry queues behind the default trial),
    # not the failure budget of 10. (The trainer is free when a job's end arrives, so one
    # more trial may start before the failure is recorded.)
    assert 3 <= trainers.started <= 4


async def test_an_internal_failure_that_passes_on_the_retry_is_forgotten(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    trainers.fail_with = {0: JobFailed("INTERNAL", "internal error (OSError: disk hiccup)")}
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    study = await run(optimizer, create(data, n=5, pruner="none", name="passing"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    trials = await trials_of(optimizer, "passing")
    assert trials[0].state == optimizer_pb2.TRIAL_STATE_FAIL
    retry = next(t for t in trials if t.attempt == 2)
    assert retry.state == optimizer_pb2.TRIAL_STATE_COMPLETE
    assert retry.hyperparameters == trials[0].hyperparameters


class ComingTrainers:
    """Discovery of trainers scaled to zero: none until `appear()`, then one."""

    def __init__(self) -> None:
        self.present: list[str] = []

    def appear(self) -> None:
        self.present = ["127.0.0.1:1"]

    async def addresses(self) -> list[str]:
        return list(self.present)

    async def mark(self, address: str, busy: bool) -> None:
        pass


async def test_with_no_trainer_a_study_is_refused_unless_trainers_may_scale_from_zero(
    tmp_path: Path, data: Path
) -> None:
    def optimizer(wait: bool) -> Optimizer:
        return Optimizer(
            storage=optuna.storages.InMemoryStorage(),
            trainers=FakeTrainers(epochs=1),
            discovery=ComingTrainers(),
            evaluator=FakeEvaluator(),
            judges=FakeJudges(),
            defaults=TrainingDefaults(),
            options=OptimizerOptions(
                artifact_root=tmp_path, poll_seconds=0.01, wait_for_trainers=wait
            ),
        )

    with pytest.raises(Unavailable) as caught:
        await create_with(optimizer(False), create(data, name="refused"))
    assert "LORATUNE_TRAINERS_SCALE_FROM_ZERO" in caught.value.message
    assert (await create_with(optimizer(True), create(data, name="accepted"))).study_id


async def test_a_study_waits_for_a_trainer_saying_why_and_completes_when_one_appears(
    tmp_path: Path, data: Path
) -> None:
    discovery = ComingTrainers()
    optimizer = Optimizer(
        storage=optuna.storages.InMemoryStorage(),
        trainers=FakeTrainers(epochs=1),
        discovery=discovery,
        evaluator=FakeEvaluator(),
        judges=FakeJudges(),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(artifact_root=tmp_path, poll_seconds=0.01, wait_for_trainers=True),
    )
    study = await create_with(optimizer, create(data, n=5, pruner="none", name="waits"))
    events: list[optimizer_pb2.StudyEvent] = []

    async def follow() -> None:
        async for event in optimizer.watch(study.study_id):
            events.append(event_to_proto(event))

    follower = asyncio.create_task(follow())
    for _ in range(500):
        waiting = study_to_proto(await optimizer.get_study(study.study_id))
        if waiting.waiting_reason:
            break
        await asyncio.sleep(0.01)
    assert waiting.waiting_reason == "waiting for a trainer: 0 ready"
    assert waiting.HasField("waiting_since") and waiting.trials_running == 0
    # Listed studies say it too, and the wait is an event of the study's stream.
    listed = [study_to_proto(v) for v in await optimizer.list_studies(0)]
    assert listed[0].waiting_reason == waiting.waiting_reason
    discovery.appear()
    await asyncio.wait_for(follower, 30)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "study_waiting" and kinds.count("study_waiting") == 1
    assert events[0].study_waiting.reason == "waiting for a trainer: 0 ready"
    assert kinds.index("trial_started") > 0
    final = study_to_proto(await optimizer.get_study(study.study_id))
    assert final.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert final.trials_complete + final.trials_reused >= 5
    assert not final.waiting_reason and not final.HasField("waiting_since")


class StallingTrainers(FakeTrainers):
    """Once `stall` is set, jobs run until they are cancelled."""

    stall = False

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        if not self.stall:
            async for event in super().watch(address, job_id):
                yield event
            return
        while job_id not in self.cancelled:  # noqa: ASYNC110 (the fake's cancel is a list)
            await asyncio.sleep(0.01)
        yield JobFailed("CANCELLED", "cancelled by a client")


async def test_nothing_of_a_finished_study_stays_in_the_optimizers_memory(
    tmp_path: Path, data: Path
) -> None:
    trainers = StallingTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    done = await run(optimizer, create(data, n=5, name="done"))
    assert done.state == optimizer_pb2.STUDY_STATE_COMPLETED
    trainers.stall = True  # the next study's jobs run until its cancel
    cancelled = await create_with(optimizer, create(data, n=5, name="gone"))
    for _ in range(500):
        if await optimizer.store.trials("gone", (optuna.trial.TrialState.RUNNING,)):
            break
        await asyncio.sleep(0.01)
    await optimizer.cancel_study(cancelled.study_id)
    for _ in range(100):
        if not optimizer._runners:
            break
        await asyncio.sleep(0.01)
    # Per-study state: runners, cancel marks, waits, trial gauges, storage locks, leases.
    assert not optimizer._runners and not optimizer._cancelled
    assert not optimizer._waiting and not any(optimizer._running_trials.values())
    assert not optimizer._waiting_trials
    assert not optimizer.store._locks
    assert not optimizer.pool._in_use
