"""`loratune projects`: the team's projects, from an optimizer or from LORATUNE_PROJECTS here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.cli.errors import exit_for, run_rpc
from services.common.client import ClientSettings, create_channel
from services.common.errors import InvalidArgument
from services.common.labels import model_label

__all__ = ["defaults_text", "projects_table", "register", "task_label"]

console = Console()
errors = Console(stderr=True)


def task_label(dataset: common_pb2.DatasetSpec) -> str:
    """'classification' or 'generation'."""
    return str(common_pb2.TaskType.Name(dataset.task_type)).removeprefix("TASK_TYPE_").lower()


def defaults_text(project: optimizer_pb2.Project) -> str:
    """The project's defaults on one line: model, trials, judge, searched and fixed fields."""
    parts = []
    if project.base_model_name:
        parts.append(model_label(project.base_model_name))
    if project.n_trials:
        parts.append(f"{project.n_trials} trials")
    if project.use_llm_judge:
        parts.append(f"judge {project.judge_model_id or '(default)'}")
    elif project.judge_model_id:
        parts.append(f"judge off ({project.judge_model_id} when on)")
    searched = [f.name for f, _ in project.search_space.ListFields()]
    if searched:
        parts.append("search " + ", ".join(searched))
    fixed = [f"{f.name}={value}" for f, value in project.training.ListFields()]
    if fixed:
        parts.append(", ".join(fixed))
    return "; ".join(parts) or "-"


def projects_table(projects: Sequence[optimizer_pb2.Project]) -> Table:
    """One row a project: id, name, task, the dataset's file, its defaults."""
    table = Table(title="Projects", box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("id", "name", "task", "dataset", "defaults"):
        table.add_column(column, justify="right" if column == "id" else "left")
    for p in projects:
        table.add_row(
            str(p.project_id),
            escape(p.name),
            task_label(p.dataset),
            escape(p.dataset.uri),
            escape(defaults_text(p)),
        )
    return table


async def _from_optimizer(address: str) -> optimizer_pb2.ListProjectsResponse:
    async with create_channel(address, ClientSettings.from_env()) as channel:
        stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
        reply: optimizer_pb2.ListProjectsResponse = await stub.ListProjects(
            optimizer_pb2.ListProjectsRequest()
        )
        return reply


def _from_file() -> list[optimizer_pb2.Project] | None:
    """The projects of LORATUNE_PROJECTS read here (None when it is not set); a bad file
    ends the command with its error (exit 2)."""
    # The optimizer's own reader, so that the file is checked exactly as it will be.
    from services.optimizer.api.convert import project_to_proto, search_space_from_json
    from services.optimizer.config import OptimizerSettings
    from services.optimizer.core.project_file import read_projects

    path = OptimizerSettings().projects_file()
    if path is None:
        return None
    try:
        projects = read_projects(path, search_space_from_json)
    except InvalidArgument as err:
        raise exit_for(InvalidArgument(f"LORATUNE_PROJECTS file {path}: {err}")) from None
    return [project_to_proto(p) for p in projects]


def register(app: typer.Typer) -> None:
    """Adds `projects` to the `loratune` app."""

    @app.command("projects")
    def projects(
        optimizer: Annotated[
            str | None,
            typer.Option(
                "--optimizer",
                envvar="LORATUNE_OPTIMIZER_ADDRESS",
                help="Optimizer address host:port; none = read LORATUNE_PROJECTS here.",
            ),
        ] = None,
    ) -> None:
        """List the team's projects: id, name, task, dataset and the defaults of their studies.

        `loratune tune --project ID` starts a study of one. Without --optimizer (or
        LORATUNE_OPTIMIZER_ADDRESS) the file in LORATUNE_PROJECTS is read and checked here,
        as the optimizer would: a bad file exits 2 with the entry and field named.
        """
        problem = ""
        if optimizer:
            reply = run_rpc(_from_optimizer(optimizer))
            found: list[optimizer_pb2.Project] | None = list(reply.projects)
            problem = reply.projects_file_error
        else:
            found = _from_file()
            if found is None:
                console.print(
                    "no projects: LORATUNE_PROJECTS is not set "
                    "(pass --optimizer to ask a running optimizer)"
                )
                return
        if found:
            console.print(projects_table(found))
        else:
            console.print("no projects")
        if problem:
            tail = (
                "the projects above are its last good version"
                if found
                else "no projects are in use"
            )
            errors.print(f"[yellow]warning:[/yellow] {escape(problem)} ({tail})", soft_wrap=True)
