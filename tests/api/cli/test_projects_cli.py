"""`loratune projects` and `loratune tune --project`, against an optimizer on fake ports.

Fast: the optimizer is the real service and core, its trainers and evaluator fakes.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import optuna
import pytest
from click.testing import Result
from typer.testing import CliRunner

from services.cli.main import app
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.clients import Channels, StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.projects import ProjectCatalog
from services.optimizer.main import service_definition
from tests.api.optimizer.test_projects_api import PROJECTS, write_data
from tests.unit.optimizer.test_optimizer_core import FakeEvaluator, FakeJudges, FakeTrainers

runner = CliRunner()
ENV: dict[str, str | None] = {
    "COLUMNS": "200",
    "LORATUNE_OPTIMIZER_ADDRESS": None,
    "LORATUNE_PROJECTS": None,
}


@pytest.fixture
def projects_file(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    folder.mkdir()
    write_data(folder)
    path = folder / "projects.yaml"
    path.write_text(PROJECTS)
    return path


@pytest.fixture
async def address(tmp_path: Path, projects_file: Path) -> AsyncIterator[str]:
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
        CommonSettings(reflection=False, auth_token=None),
        host="127.0.0.1",
        metrics_port=None,
    )
    yield server.address
    await server.stop(1)


async def invoke(args: list[str], **env: str) -> Result:
    # The optimizer serves on this test's event loop: the CLI (its own loop) runs in a thread.
    return await asyncio.to_thread(runner.invoke, app, args, env={**ENV, **env})


def row(output: str, *cells: str) -> bool:
    return re.search(r"\s+".join(re.escape(c) for c in cells), output) is not None


async def test_projects_lists_them_from_the_optimizer(address: str, projects_file: Path) -> None:
    result = await invoke(["projects", "--optimizer", address])
    assert result.exit_code == 0, result.output
    data = projects_file.parent / "data"
    assert row(result.output, "123", "support", "generation", str(data / "support.jsonl"), "-")
    assert row(
        result.output,
        *("124", "payments", "classification", str(data / "payments.jsonl")),
        "org/model; 5 trials; search rank, num_epochs; max_seq_length=64",
    ), result.output

    # A bad edit: the last good version, and a warning naming the file and the field.
    projects_file.write_text(PROJECTS.replace("n_trials: 5", "n_trials: 500"))
    result = await invoke(["projects"], LORATUNE_OPTIMIZER_ADDRESS=address)
    assert result.exit_code == 0, result.output
    assert row(result.output, "124", "payments")
    assert "warning:" in result.output and str(projects_file) in result.output
    assert "projects[1].n_trials" in result.output


async def test_projects_reads_the_file_here_without_an_optimizer(projects_file: Path) -> None:
    result = await invoke(["projects"], LORATUNE_PROJECTS=str(projects_file))
    assert result.exit_code == 0, result.output
    assert row(result.output, "124", "payments", "classification")
    result = await invoke(["projects"])
    assert result.exit_code == 0 and "LORATUNE_PROJECTS is not set" in result.output
    projects_file.write_text(PROJECTS.replace("name: payments", 'name: ""'))
    result = await invoke(["projects"], LORATUNE_PROJECTS=str(projects_file))
    assert result.exit_code == 2, result.output
    assert "error (INVALID_ARGUMENT): LORATUNE_PROJECTS file" in result.output
    assert "projects[1].name: must not be empty" in result.output


async def test_tune_project_starts_and_follows_the_projects_study(address: str) -> None:
    result = await invoke(["tune", "--project", "124", "--study-name", "p", "--optimizer", address])
    assert result.exit_code == 0, result.output
    assert "project 124 payments: classification data" in result.output
    assert "study p: 5 trials of org/model" in result.output
    assert "study p: COMPLETED" in result.output

    # The project's classification data and the judge: refused with the field, exit 2.
    result = await invoke(["tune", "--project", "124", "--judge", "gemini", "--optimizer", address])
    assert result.exit_code == 2, result.output
    assert "error (INVALID_ARGUMENT): fine_tuning_params.use_llm_judge" in result.output
    result = await invoke(["tune", "--project", "999", "--optimizer", address])
    assert result.exit_code == 2, result.output
    assert "error (NOT_FOUND): project 999 not found" in result.output


def test_tune_needs_a_dataset_or_a_project_not_both(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tune"], env=ENV)
    assert result.exit_code == 2 and "--project ID" in result.output
    data = tmp_path / "d.csv"
    result = runner.invoke(
        app, ["tune", "--project", "5", "--dataset", str(data), "--seed", "1"], env=ENV
    )
    assert result.exit_code == 2 and "leave out --dataset, --seed" in result.output
    result = runner.invoke(app, ["tune", "--project", "0"], env=ENV)
    assert result.exit_code == 2 and "--project: expected a project id > 0" in result.output


def test_an_optimizer_that_cannot_be_reached_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unreachable = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    result = runner.invoke(app, ["projects", "--optimizer", unreachable], env=ENV)
    assert result.exit_code == 1 and "error (UNAVAILABLE)" in result.output


def test_tune_project_in_process_reads_the_projects_file(
    tmp_path: Path, projects_file: Path
) -> None:
    # The embedded optimizer knows the file's projects: 999 is simply not among them.
    args = ["tune", "--project", "999", "--artifact-root", str(tmp_path / "runs")]
    result = runner.invoke(app, args, env={**ENV, "LORATUNE_PROJECTS": str(projects_file)})
    assert result.exit_code == 2, result.output
    assert "error (NOT_FOUND): project 999 not found" in result.output
    assert "no projects are configured" not in result.output
