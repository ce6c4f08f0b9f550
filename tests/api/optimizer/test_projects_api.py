"""ListProjects, GetProject and CreateStudy by project over gRPC, the core on fake ports.

The seed's request, as teams send it (protobuf JSON with only a project id for the data),
starts a study of the project's dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import optuna
import pytest
from google.protobuf import json_format

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.clients import Channels, StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.projects import ProjectCatalog
from services.optimizer.main import service_definition
from tests.unit.optimizer.test_optimizer_core import FakeEvaluator, FakeJudges, FakeTrainers

SEED = (
    '{"project_id": 123, "fine_tuning_params": {"use_llm_judge": true, '
    '"judge_model_id": "gemini", "base_model_name": "Qwen/Qwen3-0.6B", "n_trials": 20}}'
)

PROJECTS = """
projects:
  - id: 123
    name: support
    dataset: {uri: data/support.jsonl, task_type: generation, seed: 3}
  - id: 124
    name: payments
    dataset: {uri: data/payments.jsonl, task_type: classification}
    base_model_name: org/model
    n_trials: 5
    search_space: {rank: [4], num_epochs: [1]}
    training: {max_seq_length: 64}
"""


def write_data(folder: Path) -> None:
    data = folder / "data"
    data.mkdir()
    (data / "support.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8))
    )
    (data / "payments.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}", "label": f"l{i % 2}"}) + "\n" for i in range(8))
    )


@pytest.fixture
def projects_file(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    write_data(folder)
    path = folder / "projects.yaml"
    path.write_text(PROJECTS)
    return path


@pytest.fixture
async def stub(
    tmp_path: Path, projects_file: Path
) -> AsyncIterator[optimizer_pb2_grpc.OptimizerServiceAsyncStub]:
    optimizer = Optimizer(
        storage=optuna.storages.InMemoryStorage(),
        trainers=FakeTrainers(epochs=1),
        discovery=StaticTrainers(["127.0.0.1:1"]),
        evaluator=FakeEvaluator(),
        judges=FakeJudges(),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(artifact_root=tmp_path / "runs", poll_seconds=0.01),
        projects=ProjectCatalog(projects_file, search_space_from_json),
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


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_the_projects_are_listed_and_found_by_id(stub: Any, projects_file: Path) -> None:
    reply = await stub.ListProjects(optimizer_pb2.ListProjectsRequest())
    assert [(p.project_id, p.name) for p in reply.projects] == [(123, "support"), (124, "payments")]
    assert reply.projects_file_error == ""
    payments = (await stub.GetProject(optimizer_pb2.GetProjectRequest(project_id=124))).project
    assert payments == reply.projects[1]
    assert payments.dataset.uri == str(projects_file.parent / "data" / "payments.jsonl")
    assert payments.dataset.task_type == common_pb2.TASK_TYPE_CLASSIFICATION
    assert payments.base_model_name == "org/model" and payments.n_trials == 5
    assert list(payments.search_space.rank) == [4] and payments.training.max_seq_length == 64

    error = await refused(stub.GetProject(optimizer_pb2.GetProjectRequest(project_id=999)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "project 999 not found"
    error = await refused(stub.GetProject(optimizer_pb2.GetProjectRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("project_id: ")


async def test_the_seeds_json_request_starts_a_study_of_the_projects_data(stub: Any) -> None:
    request = json_format.Parse(SEED, optimizer_pb2.CreateStudyRequest())
    study = (await stub.CreateStudy(request)).study
    project = (await stub.GetProject(optimizer_pb2.GetProjectRequest(project_id=123))).project
    assert study.project_id == 123 and study.study_id.startswith("study-123-")
    assert study.dataset == project.dataset and study.dataset.seed == 3
    assert study.objective_name == "combined"
    assert study.fine_tuning_params == optimizer_pb2.FineTuningParams(
        use_llm_judge=True, judge_model_id="gemini", base_model_name="Qwen/Qwen3-0.6B", n_trials=20
    )
    listed = (await stub.ListStudies(optimizer_pb2.ListStudiesRequest(project_id=123))).studies
    assert [s.study_id for s in listed] == [study.study_id]
    await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id=study.study_id))


async def test_a_project_fills_what_the_request_leaves_unset(stub: Any) -> None:
    created = (
        await stub.CreateStudy(optimizer_pb2.CreateStudyRequest(project_id=124, study_name="p"))
    ).study
    assert created.fine_tuning_params.base_model_name == "org/model"
    assert created.fine_tuning_params.n_trials == 5 and not created.fine_tuning_params.use_llm_judge
    async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="p"), timeout=30):
        if event.WhichOneof("event") == "study_finished":
            assert event.study_finished.study.state == optimizer_pb2.STUDY_STATE_COMPLETED
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="p"))).trials
    assert len(trials) == 5
    # The project's search space and fixed training parameters held for every trial.
    assert {
        (t.hyperparameters.lora.rank, t.hyperparameters.training.num_epochs) for t in trials
    } <= {
        (4, 1),
        (4, 0),  # the linear-probe baseline of a classification space
    }
    assert all(t.hyperparameters.training.max_seq_length == 64 for t in trials)


async def test_what_a_project_cannot_give_is_refused(stub: Any, tmp_path: Path) -> None:
    # A classification project and the judge: refused as for a request's own dataset.
    seed = json_format.Parse(SEED, optimizer_pb2.CreateStudyRequest())
    seed.project_id = 124
    error = await refused(stub.CreateStudy(seed))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("fine_tuning_params.use_llm_judge: ")

    seed.project_id = 999
    error = await refused(stub.CreateStudy(seed))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "project 999 not found"

    error = await refused(stub.CreateStudy(optimizer_pb2.CreateStudyRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("dataset: ")

    # A request with its own dataset works as before: the unknown project id is a label.
    data = tmp_path / "own.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "t", "label": f"l{i % 2}"}) + "\n" for i in range(8))
    )
    own = optimizer_pb2.CreateStudyRequest(
        project_id=999,
        fine_tuning_params=optimizer_pb2.FineTuningParams(base_model_name="org/model", n_trials=5),
        dataset=common_pb2.DatasetSpec(
            uri=str(data), task_type=common_pb2.TASK_TYPE_CLASSIFICATION
        ),
    )
    study = (await stub.CreateStudy(own)).study
    assert study.project_id == 999 and study.dataset.uri == str(data)
    await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id=study.study_id))


async def test_an_edit_of_the_file_is_served_and_a_bad_one_reported(
    stub: Any, projects_file: Path
) -> None:
    fresh = projects_file.with_name("next.yaml")
    fresh.write_text(PROJECTS.replace("id: 124", "id: 125"))
    os.replace(fresh, projects_file)
    reply = await stub.ListProjects(optimizer_pb2.ListProjectsRequest())
    assert [p.project_id for p in reply.projects] == [123, 125]

    projects_file.write_text(PROJECTS.replace("task_type: generation", "task_type: summaries"))
    reply = await stub.ListProjects(optimizer_pb2.ListProjectsRequest())
    assert [p.project_id for p in reply.projects] == [123, 125]  # the last good version
    assert str(projects_file) in reply.projects_file_error
    assert "projects[0].dataset.task_type" in reply.projects_file_error
    assert "(project 123)" in reply.projects_file_error
    error = await refused(stub.GetProject(optimizer_pb2.GetProjectRequest(project_id=124)))
    assert error.details().startswith("project 124 not found (the projects file's latest")
