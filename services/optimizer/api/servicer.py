"""The thin gRPC servicer of OptimizerService."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.errors import InvalidArgument
from services.optimizer.api.convert import (
    event_to_proto,
    project_to_proto,
    study_request_from_proto,
    study_to_proto,
    trial_to_proto,
)
from services.optimizer.api.paging import MAX_TRIAL_PAGE, page_token, read_page_token
from services.optimizer.core.events import StudyEvent
from services.optimizer.core.optimizer import Optimizer


class OptimizerServicer(optimizer_pb2_grpc.OptimizerServiceServicer):
    """Serves `loratune.optimizer.v1.OptimizerService`; errors are mapped by the interceptor."""

    # Events converted once for all their watchers (a 300-class evaluation's conversion costs
    # milliseconds; 50 watchers of one study would pay it 50 times).
    EVENT_CACHE = 512

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = optimizer
        self._events: OrderedDict[int, tuple[StudyEvent, optimizer_pb2.StudyEvent]] = OrderedDict()

    def _event_message(self, event: StudyEvent) -> optimizer_pb2.StudyEvent:
        """The event's message, converted at its first watcher's turn (the cache holds the
        event itself, so its id is not reused while cached)."""
        held = self._events.get(id(event))
        if held is not None and held[0] is event:
            self._events.move_to_end(id(event))
            return held[1]
        message = event_to_proto(event)
        self._events[id(event)] = (event, message)
        while len(self._events) > self.EVENT_CACHE:
            self._events.popitem(last=False)
        return message

    async def CreateStudy(
        self, request: optimizer_pb2.CreateStudyRequest, context: Any
    ) -> optimizer_pb2.CreateStudyResponse:
        """Creates and starts a study (idempotent by study_name)."""
        study = await self._optimizer.create_study(study_request_from_proto(request))
        return optimizer_pb2.CreateStudyResponse(study=study_to_proto(study))

    async def GetStudy(
        self, request: optimizer_pb2.GetStudyRequest, context: Any
    ) -> optimizer_pb2.GetStudyResponse:
        """One study."""
        study = await self._optimizer.get_study(request.study_id)
        return optimizer_pb2.GetStudyResponse(study=study_to_proto(study))

    async def ListStudies(
        self, request: optimizer_pb2.ListStudiesRequest, context: Any
    ) -> optimizer_pb2.ListStudiesResponse:
        """Studies, newest first."""
        studies = await self._optimizer.list_studies(request.project_id)
        return optimizer_pb2.ListStudiesResponse(studies=[study_to_proto(s) for s in studies])

    async def ListTrials(
        self, request: optimizer_pb2.ListTrialsRequest, context: Any
    ) -> optimizer_pb2.ListTrialsResponse:
        """A study's trials, a page at a time when asked (page_size, page_token)."""
        if not 0 <= request.page_size <= MAX_TRIAL_PAGE:
            raise InvalidArgument(
                f"must be between 0 and {MAX_TRIAL_PAGE} (got {request.page_size})",
                field="page_size",
            )
        after = read_page_token(request.page_token, request.study_id)
        trials, last = await self._optimizer.list_trial_page(
            request.study_id, request.page_size, after
        )
        return optimizer_pb2.ListTrialsResponse(
            trials=[
                trial_to_proto(t, detail=request.view != optimizer_pb2.TRIAL_VIEW_BASIC)
                for t in trials
            ],
            next_page_token="" if last is None else page_token(request.study_id, last),
        )

    async def CancelStudy(
        self, request: optimizer_pb2.CancelStudyRequest, context: Any
    ) -> optimizer_pb2.CancelStudyResponse:
        """Cancels a study and its running jobs."""
        study = await self._optimizer.cancel_study(request.study_id)
        return optimizer_pb2.CancelStudyResponse(study=study_to_proto(study))

    async def WatchStudy(
        self, request: optimizer_pb2.WatchStudyRequest, context: Any
    ) -> AsyncIterator[optimizer_pb2.StudyEvent]:
        """The study's events until it finishes."""
        async for event in self._optimizer.watch(request.study_id):
            yield self._event_message(event)

    async def ListProjects(
        self, request: optimizer_pb2.ListProjectsRequest, context: Any
    ) -> optimizer_pb2.ListProjectsResponse:
        """The team's projects, and why the projects file's latest version did not load."""
        listing = await self._optimizer.list_projects()
        return optimizer_pb2.ListProjectsResponse(
            projects=[project_to_proto(p) for p in listing.projects],
            projects_file_error=listing.problem,
        )

    async def GetProject(
        self, request: optimizer_pb2.GetProjectRequest, context: Any
    ) -> optimizer_pb2.GetProjectResponse:
        """One project."""
        project = await self._optimizer.get_project(request.project_id)
        return optimizer_pb2.GetProjectResponse(project=project_to_proto(project))
