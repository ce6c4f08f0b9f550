"""A whole study over gRPC on real trainers and a real evaluator (tiny models, CPU)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.main import build_evaluator
from services.evaluator.main import service_definition as evaluator_definition
from services.optimizer.config import OptimizerSettings
from services.optimizer.main import build_optimizer
from services.optimizer.main import service_definition as optimizer_definition
from services.trainer.config import TrainerSettings
from services.trainer.main import build_manager
from services.trainer.main import service_definition as trainer_definition
from tests.unit.trainer.conftest import build_tiny_qwen

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture
def sentiment(tmp_path: Path) -> Path:
    words = ["good", "great", "bad", "awful"]
    rows = [
        {"text": f"w{i % 7} {words[i % 4]} w{i % 5}", "label": "pos" if i % 4 < 2 else "neg"}
        for i in range(24)
    ]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Stack:
    """Trainers, an evaluator and an optimizer, each its own server on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[RunningServer] = []
        self.trainers: list[RunningServer] = []
        self.optimizer: RunningServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self, n_trainers: int = 1) -> optimizer_pb2_grpc.OptimizerServiceAsyncStub:
        common = CommonSettings()
        for _ in range(n_trainers):
            settings = TrainerSettings(
                artifact_root=self.root / "runs", trainer_progress_every_steps=2
            )
            server = await start_server(
                [trainer_definition(build_manager(settings), settings, TrainingDefaults())],
                common,
                host="127.0.0.1",
                metrics_port=None,
            )
            self.trainers.append(server)
        evaluator = await start_server(
            [evaluator_definition(build_evaluator(EvaluatorSettings()))],
            common,
            host="127.0.0.1",
            metrics_port=None,
        )
        self.servers += [*self.trainers, evaluator]
        settings = OptimizerSettings(
            trainers=",".join(t.address for t in self.trainers),
            evaluator_address=evaluator.address,
            artifact_root=self.root / "runs",
            poll_seconds=0.2,
        )
        optimizer, channels = build_optimizer(settings, TrainingDefaults(), ClientSettings())
        self.optimizer = await start_server(
            [optimizer_definition(optimizer, channels)],
            common,
            host="127.0.0.1",
            metrics_port=None,
        )
        self.servers.insert(0, self.optimizer)
        self.channel = grpc.aio.insecure_channel(self.optimizer.address)
        return optimizer_pb2_grpc.OptimizerServiceStub(self.channel)  # type: ignore[return-value]

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        for server in self.servers:
            await server.stop(2)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path)
    yield s
    await s.stop()


def study_request(dataset: Path, base_model: Path, **kw: Any) -> optimizer_pb2.CreateStudyRequest:
    request = optimizer_pb2.CreateStudyRequest(
        project_id=123,
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name=str(base_model), n_trials=kw.pop("n_trials", 5)
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(dataset),
            task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
            validation_fraction=0.25,
            seed=5,
        ),
        search_space=optimizer_pb2.SearchSpace(
            rank=[4, 8],
            num_epochs=[2],
            learning_rate=optimizer_pb2.FloatRange(low=1e-3, high=1e-2, log=True),
        ),
        training=common_pb2.TrainingParams(batch_size=4, max_seq_length=32),
        **kw,
    )
    return request


async def finish(stub: Any, study_id: str) -> list[optimizer_pb2.StudyEvent]:
    events = []
    async for event in stub.WatchStudy(
        optimizer_pb2.WatchStudyRequest(study_id=study_id), timeout=300
    ):
        events.append(event)
    return events


async def test_whole_study_publishes_the_best_adapter(
    stack: Stack, sentiment: Path, tiny_qwen: Path
) -> None:
    stub = await stack.start(n_trainers=1)
    created = await stub.CreateStudy(study_request(sentiment, tiny_qwen, study_name="s1"))
    study = created.study
    assert study.study_id == "s1" and study.project_id == 123
    assert study.fine_tuning_params.n_trials == 5
    events = await finish(stub, "s1")
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "study_finished"
    assert {"trial_started", "trial_evaluated", "trial_finished"} <= set(kinds)
    final = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id="s1"))).study
    assert final.state == optimizer_pb2.STUDY_STATE_COMPLETED, final.failure_reason
    assert final.trials_complete + final.trials_pruned == 5
    assert final.objective_name == "f1_macro"
    assert final.best_trial.HasField("objective")
    best = Path(final.best_model_dir)
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.json",
        "evaluation_results.json",
        "class_weights.json",
        "study.json",
    ):
        assert (best / name).is_file(), name
    summary = json.loads((best / "study.json").read_text())
    assert len(summary["trials"]) >= 5 and summary["best_trial"] == final.best_trial.number
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="s1"))).trials
    finished = [
        t
        for t in trials
        if t.state in (optimizer_pb2.TRIAL_STATE_COMPLETE, optimizer_pb2.TRIAL_STATE_PRUNED)
    ]
    assert len(finished) == 5
    first = trials[0]
    assert first.hyperparameters.lora.rank in (4, 8)
    assert first.evaluation.objective_name == "f1_macro"
    assert (Path(first.artifact_dir) / "evaluation_results.json").is_file()
    studies = (await stub.ListStudies(optimizer_pb2.ListStudiesRequest(project_id=123))).studies
    assert [s.study_id for s in studies] == ["s1"]
    # Idempotent by name; different parameters under the same name are refused.
    again = await stub.CreateStudy(study_request(sentiment, tiny_qwen, study_name="s1"))
    assert again.study.study_id == "s1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateStudy(study_request(sentiment, tiny_qwen, study_name="s1", n_trials=6))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id="s1"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_parallel_trainers_and_cancel(stack: Stack, sentiment: Path, tiny_qwen: Path) -> None:
    stub = await stack.start(n_trainers=2)
    await stub.CreateStudy(study_request(sentiment, tiny_qwen, study_name="par", n_trials=6))
    await finish(stub, "par")
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="par"))).trials
    assert {t.trainer for t in trials} == {t.address for t in stack.trainers}
    await stub.CreateStudy(study_request(sentiment, tiny_qwen, study_name="stop", n_trials=100))
    cancelled = (await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id="stop"))).study
    assert cancelled.state == optimizer_pb2.STUDY_STATE_CANCELLED


async def test_cancel_stops_the_running_job_on_its_trainer(
    stack: Stack, sentiment: Path, tiny_qwen: Path
) -> None:
    from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc

    stub = await stack.start(n_trainers=1)
    request = study_request(sentiment, tiny_qwen, study_name="halt", n_trials=5)
    request.search_space.num_epochs[:] = [50]  # far longer than the test waits
    await stub.CreateStudy(request)
    started = None
    async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="halt")):
        if event.HasField("trial_progress"):
            break
        if event.HasField("trial_started"):
            started = event.trial_started.trial
    assert started is not None
    cancelled = (await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id="halt"))).study
    assert cancelled.state == optimizer_pb2.STUDY_STATE_CANCELLED
    async with grpc.aio.insecure_channel(stack.trainers[0].address) as channel:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        last = None
        async for event in trainer.WatchTraining(
            trainer_pb2.WatchTrainingRequest(job_id="halt-t0-a1"), timeout=30
        ):
            last = event
        assert last is not None and last.failed.reason == trainer_pb2.FAILURE_REASON_CANCELLED
        status = await trainer.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
        assert not status.busy


async def test_a_module_set_the_model_lacks_fails_the_study_on_its_first_trial(
    stack: Stack, sentiment: Path, tiny_qwen: Path
) -> None:
    stub = await stack.start(n_trainers=1)
    request = study_request(sentiment, tiny_qwen, study_name="nomods", n_trials=5)
    request.search_space.target_modules.add(name="all-linear")
    request.search_space.target_modules.add(name="mine", modules=["query_proj"])
    await stub.CreateStudy(request)
    await finish(stub, "nomods")
    study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id="nomods"))).study
    assert study.state == optimizer_pb2.STUDY_STATE_FAILED
    assert "hyperparameters.lora.target_modules" in study.failure_reason
    assert "query_proj" in study.failure_reason and "q_proj" in study.failure_reason
    # The named set is tried right after the first trial, before the sampler's own.
    assert study.trials_failed == 1 and study.trials_complete <= 1


async def test_classes_left_out_are_reported_and_scored_as_misses(
    stack: Stack, tiny_qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli.optimizer_commands import console, render_result

    monkeypatch.setenv("MIN_SAMPLES_PER_CLASS", "5")
    words = ["good", "great", "bad", "awful"]
    rows = [
        {"text": f"w{i % 7} {words[i % 4]} w{i % 5}", "label": "pos" if i % 4 < 2 else "neg"}
        for i in range(24)
    ] + [{"text": f"w{i} maybe w{i + 1}", "label": "rare"} for i in range(3)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validation = tmp_path / "validation.jsonl"
    held_out = [*rows[:8], {"text": "w9 maybe w2", "label": "rare"}]
    held_out.append({"text": "w8 maybe w3", "label": "rare"})
    validation.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    stub = await stack.start(n_trainers=1)
    request = study_request(train, tiny_qwen, study_name="tail", n_trials=5)
    request.dataset.validation_uri = str(validation)
    request.search_space.num_epochs[:] = [1]
    await stub.CreateStudy(request)
    await finish(stub, "tail")
    study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id="tail"))).study
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="tail"))).trials
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert [(c.label, c.train_rows, c.validation_rows) for c in study.excluded_classes] == [
        ("rare", 3, 2)
    ]
    assert "count as misses" in study.excluded_note
    for trial in trials:
        evaluation = trial.evaluation
        assert [c.label for c in evaluation.excluded_classes] == ["rare"]
        rare = next(c for c in evaluation.classification.per_class if c.label == "rare")
        assert rare.support == 2 and rare.recall == 0.0 and rare.f1 == 0.0
        others = [c.f1 for c in evaluation.classification.per_class if c.label != "rare"]
        assert evaluation.classification.f1_macro == pytest.approx(sum(others) / 3)
    saved = json.loads((Path(study.best_model_dir) / "evaluation_results.json").read_text())
    assert saved["excludedClasses"] == [{"label": "rare", "trainRows": 3, "validationRows": 2}]
    with console.capture() as captured:
        render_result(study, trials)
    assert "left out of training" in captured.get() and "rare" in captured.get()
