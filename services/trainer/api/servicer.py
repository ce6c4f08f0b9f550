"""The thin gRPC servicer of TrainerService."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.defaults import TrainingDefaults
from services.trainer.api.convert import (
    event_to_proto,
    job_from_proto,
    job_id_from_proto,
    job_to_proto,
    status_to_proto,
)
from services.trainer.core.jobs import JobManager


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Serves `loratune.trainer.v1.TrainerService`; errors are mapped by the interceptor."""

    def __init__(
        self, manager: JobManager, defaults: TrainingDefaults, artifact_root: Path
    ) -> None:
        self._manager = manager
        self._defaults = defaults
        self._root = artifact_root

    async def StartTraining(
        self,
        request: trainer_pb2.StartTrainingRequest,
        context: grpc.aio.ServicerContext[
            trainer_pb2.StartTrainingRequest, trainer_pb2.StartTrainingResponse
        ],
    ) -> trainer_pb2.StartTrainingResponse:
        """Validates and accepts a job; answers at once."""
        job = await self._manager.start(job_from_proto(request, self._defaults, self._root))
        return trainer_pb2.StartTrainingResponse(job=job_to_proto(job))

    async def WatchTraining(
        self,
        request: trainer_pb2.WatchTrainingRequest,
        context: grpc.aio.ServicerContext[
            trainer_pb2.WatchTrainingRequest, trainer_pb2.TrainingEvent
        ],
    ) -> AsyncIterator[trainer_pb2.TrainingEvent]:
        """Replays the job's events, then follows it live until it ends."""
        job_id = job_id_from_proto(request.job_id)
        async for record in self._manager.watch(job_id):
            yield event_to_proto(job_id, record)

    async def CancelTraining(
        self,
        request: trainer_pb2.CancelTrainingRequest,
        context: grpc.aio.ServicerContext[
            trainer_pb2.CancelTrainingRequest, trainer_pb2.CancelTrainingResponse
        ],
    ) -> trainer_pb2.CancelTrainingResponse:
        """Stops the job between steps."""
        job = await self._manager.cancel(job_id_from_proto(request.job_id))
        return trainer_pb2.CancelTrainingResponse(job=job_to_proto(job))

    async def GetTrainerStatus(
        self,
        request: trainer_pb2.GetTrainerStatusRequest,
        context: grpc.aio.ServicerContext[
            trainer_pb2.GetTrainerStatusRequest, trainer_pb2.GetTrainerStatusResponse
        ],
    ) -> trainer_pb2.GetTrainerStatusResponse:
        """Device, current job, loaded base model and memory."""
        return status_to_proto(self._manager.status())
