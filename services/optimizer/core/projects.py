"""The team's projects: the file in LORATUNE_PROJECTS, kept current, and a request filled from one.

The file (its shape in `project_file.py`) is looked at on each use: one `stat` of its
path, which follows symbolic links, so a Kubernetes ConfigMap update (a new file swapped
in by renaming a link) is seen like an edit in place. When its device, inode, size or
times differ from the version last tried, it is read again. A version that does not
validate is logged once, as an error naming the file, the entry and the field, and the
last good set stays in use (none, when the file has never loaded: the optimizer starts
and serves studies of requests that carry their dataset; `ListProjects` says what is
wrong).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument, NotFound
from services.common.names import excerpt
from services.optimizer.core.project_file import Project, SearchSpaceParser, read_projects
from services.optimizer.core.records import (
    DatasetRef,
    FineTuning,
    StudyRequest,
    TrainingOverrides,
)

__all__ = ["Project", "ProjectCatalog", "ProjectSet", "apply_project", "with_project"]

logger = logging.getLogger(__name__)

MAX_PROBLEM = 1_000


@dataclass(frozen=True)
class ProjectSet:
    """The projects in use, and why the file's current version is not among them, if so."""

    projects: tuple[Project, ...] = ()
    # Empty when the file's current version loaded; else its error, file and field named.
    problem: str = ""

    def find(self, project_id: int) -> Project | None:
        """The project of this id, or None."""
        return next((p for p in self.projects if p.project_id == project_id), None)


def _identity(path: Path) -> tuple[Any, ...]:
    """What changes when the file at `path` is edited or replaced (by rename or link swap)."""
    try:
        s = os.stat(path)
    except OSError as err:
        return ("unreadable", err.errno)
    return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


class ProjectCatalog:
    """The projects of one file (or of none), re-read when the file changes; thread-safe."""

    def __init__(self, path: Path | None, search_space: SearchSpaceParser = dict) -> None:
        self.path = path
        self._search_space = search_space
        self._lock = threading.Lock()
        self._tried: tuple[Any, ...] | None = None
        self._current = ProjectSet()

    def current(self) -> ProjectSet:
        """The projects in use, after reading the file again if it changed (blocking I/O)."""
        if self.path is None:
            return self._current
        with self._lock:
            identity = _identity(self.path)
            if identity != self._tried:
                # The identity is taken before reading: a write that lands during the read
                # changes it again, so the next use reads the file once more.
                self._tried = identity
                self._load(self.path)
            return self._current

    def _load(self, path: Path) -> None:
        shown = excerpt(str(path), 256)
        try:
            projects = read_projects(path, self._search_space)
        except InvalidArgument as err:
            problem = excerpt(f"LORATUNE_PROJECTS file {shown}: {err}", MAX_PROBLEM)
            kept = self._current.projects
            self._current = ProjectSet(kept, problem)
            logger.error("%s; serving its last good version (%d projects)", problem, len(kept))
            return
        self._current = ProjectSet(projects)
        logger.info(
            "loaded %d projects from %s: %s",
            len(projects),
            shown,
            ", ".join(f"{p.project_id} {p.name}" for p in projects[:20])
            + (" ..." if len(projects) > 20 else ""),
        )

    def get(self, project_id: int) -> Project:
        """The project of this id; NotFound naming the id (and why there may be none)."""
        current = self.current()
        found = current.find(project_id)
        if found is not None:
            return found
        if self.path is None:
            why = " (no projects are configured: LORATUNE_PROJECTS is not set)"
        elif current.problem:
            why = (
                " (the projects file's latest version did not load: see ListProjects "
                "or the optimizer's log)"
            )
        else:
            why = ""
        raise NotFound(f"project {project_id} not found{why}")


def apply_project(request: StudyRequest, project: Project) -> StudyRequest:
    """`request` with the project's dataset, and its defaults where the request has none.

    The base model when base_model_name is empty, n_trials and the time budget when 0, the
    judge model when
    the judge is on and judge_model_id empty, the judge on / off when the request carried
    no fine_tuning_params at all, and each search space dimension and fixed training
    parameter the request leaves unset.
    """
    fine = request.fine_tuning
    use_judge = fine.use_llm_judge if request.fine_tuning_given else project.use_llm_judge
    judge_id = fine.judge_model_id or (project.judge_model_id if use_judge else "")
    training = TrainingOverrides(
        **{
            f.name: getattr(request.training, f.name) or getattr(project.training, f.name)
            for f in fields(TrainingOverrides)
        }
    )
    return replace(
        request,
        dataset=project.dataset,
        fine_tuning=FineTuning(
            use_llm_judge=use_judge,
            judge_model_id=judge_id,
            base_model_name=fine.base_model_name or project.base_model_name,
            # A request naming a base searches its own bases; else the project's.
            base_model_names=fine.base_model_names
            if fine.base_model_name or fine.base_model_names
            else project.base_model_names,
            n_trials=fine.n_trials or project.n_trials,
            time_budget_seconds=fine.time_budget_seconds or project.time_budget_seconds,
        ),
        search_space={**project.search_space, **request.search_space},
        training=training,
    )


def with_project(request: StudyRequest, catalog: ProjectCatalog) -> tuple[StudyRequest, DatasetRef]:
    """The request as it is when it carries a dataset, else filled from its project (blocking
    I/O: the file may be read again); InvalidArgument or NotFound otherwise."""
    if request.dataset is not None:
        return request, request.dataset
    if request.project_id < 0:
        raise InvalidArgument(
            f"must be a project id > 0, got {request.project_id}", field="project_id"
        )
    if request.project_id == 0:
        raise InvalidArgument(
            "is required, unless project_id names a project that has one (see ListProjects)",
            field="dataset",
        )
    project = catalog.get(request.project_id)
    return apply_project(request, project), project.dataset
