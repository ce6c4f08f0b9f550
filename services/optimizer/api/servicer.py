"""The thin gRPC servicer of OptimizerService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.optimizer.core.optimizer import Optimizer


class OptimizerServicer(optimizer_pb2_grpc.OptimizerServiceServicer):
    """Serves `loratune.optimizer.v1.OptimizerService`; errors are mapped by the interceptor."""

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = optimizer

    async def CreateStudy(
        self, request: optimizer_pb2.CreateStudyRequest, context: Any
    ) -> optimizer_pb2.CreateStudyResponse:
        """Creates and starts a study (idempotent by study_name)."""
        return optimizer_pb2.CreateStudyResponse(study=await self._optimizer.create_study(request))

    async def GetStudy(
        self, request: optimizer_pb2.GetStudyRequest, context: Any
    ) -> optimizer_pb2.GetStudyResponse:
        """One study."""
        return optimizer_pb2.GetStudyResponse(study=self._optimizer.get_study(request.study_id))

    async def ListStudies(
        self, request: optimizer_pb2.ListStudiesRequest, context: Any
    ) -> optimizer_pb2.ListStudiesResponse:
        """Studies, newest first."""
        return optimizer_pb2.ListStudiesResponse(
            studies=self._optimizer.list_studies(request.project_id)
        )

    async def ListTrials(
        self, request: optimizer_pb2.ListTrialsRequest, context: Any
    ) -> optimizer_pb2.ListTrialsResponse:
        """A study's trials."""
        return optimizer_pb2.ListTrialsResponse(
            trials=self._optimizer.list_trials(request.study_id)
        )

    async def CancelStudy(
        self, request: optimizer_pb2.CancelStudyRequest, context: Any
    ) -> optimizer_pb2.CancelStudyResponse:
        """Cancels a study and its running jobs."""
        return optimizer_pb2.CancelStudyResponse(
            study=await self._optimizer.cancel_study(request.study_id)
        )

    async def WatchStudy(
        self, request: optimizer_pb2.WatchStudyRequest, context: Any
    ) -> AsyncIterator[optimizer_pb2.StudyEvent]:
        """The study's events until it finishes."""
        async for event in self._optimizer.watch(request.study_id):
            yield event
