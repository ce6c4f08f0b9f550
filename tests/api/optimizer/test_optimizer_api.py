"""OptimizerService over gRPC: the real server and interceptors, the core on fake ports.

Fast: no model is trained. Bad input gets its status with the field named, and the
service keeps serving; whole studies on real trainers are in tests/integration.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import optuna
import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.optimizer.clients import Channels, StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.main import service_definition
from tests.unit.optimizer.test_optimizer_core import FakeEvaluator, FakeJudges, FakeTrainers

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": f"l{i % 2}"}) + "\n" for i in range(8))
    )
    return path


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[optimizer_pb2_grpc.OptimizerServiceAsyncStub]:
    optimizer = Optimizer(
        storage=optuna.storages.InMemoryStorage(),
        trainers=FakeTrainers(epochs=2),
        discovery=StaticTrainers(["127.0.0.1:1"]),
        evaluator=FakeEvaluator(),
        judges=FakeJudges(),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(artifact_root=tmp_path / "runs", poll_seconds=0.01),
    )
    server = await start_server(
        [service_definition(optimizer, Channels(ClientSettings()))],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield optimizer_pb2_grpc.OptimizerServiceStub(channel)  # type: ignore[misc]
    await server.stop(1)


def request(data: Path, **kw: Any) -> optimizer_pb2.CreateStudyRequest:
    message = optimizer_pb2.CreateStudyRequest(
        project_id=5,
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name="org/model", n_trials=kw.pop("n_trials", 5)
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(data), task_type=common_pb2.TASK_TYPE_CLASSIFICATION
        ),
        pruner=kw.pop("pruner", "none"),
        **kw,
    )
    return message


def _bad(data: Path, tmp_path: Path) -> list[tuple[optimizer_pb2.CreateStudyRequest, str, Any]]:
    cases: list[tuple[optimizer_pb2.CreateStudyRequest, str, Any]] = []

    def case(field: str, code: Any = INVALID, **kw: Any) -> optimizer_pb2.CreateStudyRequest:
        message = request(data, **kw)
        cases.append((message, field, code))
        return message

    case("fine_tuning_params.n_trials", n_trials=3)
    case("dataset.uri").dataset.uri = str(tmp_path / "nope.jsonl")
    case("fine_tuning_params.base_model_name").fine_tuning_params.base_model_name = str(
        tmp_path / "no-model"
    )
    case("search_space.learning_rate").search_space.learning_rate.CopyFrom(
        optimizer_pb2.FloatRange(low=1e-2, high=1e-4)
    )
    case("search_space.target_modules").search_space.target_modules.add(name="made-up")
    case("sampler", sampler="annealing")
    case("pruner", pruner="sometimes")
    case("fine_tuning_params.use_llm_judge").fine_tuning_params.use_llm_judge = True
    case("dataset.task_type").dataset.task_type = common_pb2.TASK_TYPE_UNSPECIFIED
    case("dataset.label_field").dataset.label_field = "code"
    case("dataset.validation_fraction").dataset.validation_fraction = 1.5
    case("study_name", study_name="../../etc")
    case("study_name", study_name="/etc")
    case("study_name", study_name="x\n2026-01-01 INFO forged")
    case("study_name", study_name="y" * 20_000)
    case(
        "fine_tuning_params.base_model_name"
    ).fine_tuning_params.base_model_name = "org/model\n2026-01-01 INFO forged \x1b[31m"
    return cases


async def test_bad_input_is_refused_with_the_field_named(
    stub: Any, data: Path, tmp_path: Path
) -> None:
    for message, field, code in _bad(data, tmp_path):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateStudy(message)
        assert caught.value.code() == code, (field, caught.value.details())
        assert caught.value.details().startswith(field), (field, caught.value.details())
        assert len(caught.value.details()) < 1_000 and "\n" not in caught.value.details()
    assert not (tmp_path / "etc").exists() and not Path("/etc/trial-0").exists()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # And the service keeps serving.
    study = (await stub.CreateStudy(request(data, study_name="fine"))).study
    assert study.study_id == "fine" and study.state == optimizer_pb2.STUDY_STATE_QUEUED


async def test_a_study_runs_and_its_events_and_trials_come_back(stub: Any, data: Path) -> None:
    created = (await stub.CreateStudy(request(data, study_name="s"))).study
    again = (await stub.CreateStudy(request(data, study_name="s"))).study  # idempotent
    assert again.study_id == created.study_id == "s"
    kinds = []
    async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="s")):
        kinds.append(event.WhichOneof("event"))
    assert kinds[-1] == "study_finished" and "trial_evaluated" in kinds
    study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id="s"))).study
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED and study.trials_complete == 5
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="s"))).trials
    assert [t.number for t in trials] == list(range(5))
    # The full view (the default) sends each evaluation whole; the basic view leaves out
    # what grows with the classes, and keeps the figures.
    full = trials[0].evaluation.classification
    assert list(full.confusion_matrix.counts) == [1] and full.per_class[0].label == "x"
    basic = (
        await stub.ListTrials(
            optimizer_pb2.ListTrialsRequest(study_id="s", view=optimizer_pb2.TRIAL_VIEW_BASIC)
        )
    ).trials
    assert [t.number for t in basic] == list(range(5))
    lean = basic[0].evaluation.classification
    assert not lean.HasField("confusion_matrix") and not lean.per_class
    assert lean.f1_macro == full.f1_macro and list(lean.worst_classes) == ["x"]
    assert basic[0].objective == trials[0].objective
    # A page at a time: each page's token asks for the next, the last page has none.
    pages, token = [], ""
    while True:
        reply = await stub.ListTrials(
            optimizer_pb2.ListTrialsRequest(study_id="s", page_size=2, page_token=token)
        )
        pages.append([t.number for t in reply.trials])
        token = reply.next_page_token
        if not token:
            break
    assert pages == [[0, 1], [2, 3], [4]]
    whole = await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="s", page_size=5))
    assert len(whole.trials) == 5 and not whole.next_page_token
    first = await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="s", page_size=1))
    for bad, field in (
        (optimizer_pb2.ListTrialsRequest(study_id="s", page_size=-1), "page_size"),
        (optimizer_pb2.ListTrialsRequest(study_id="s", page_size=1001), "page_size"),
        (optimizer_pb2.ListTrialsRequest(study_id="s", page_token="not a token"), "page_token"),
        (optimizer_pb2.ListTrialsRequest(study_id="s", page_token="x" * 600), "page_token"),
        (
            optimizer_pb2.ListTrialsRequest(study_id="t", page_token=first.next_page_token),
            "page_token",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListTrials(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
    assert all(len(t.epoch_objectives) == 2 and t.best_epoch for t in trials)
    listed = (await stub.ListStudies(optimizer_pb2.ListStudiesRequest(project_id=5))).studies
    assert [s.study_id for s in listed] == ["s"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateStudy(request(data, study_name="s", n_trials=6))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id="s"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
