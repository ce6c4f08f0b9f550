"""gRPC adapters of the optimizer's ports, with a channel per address."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from loratune.evaluator.v1 import evaluator_pb2_grpc
from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.errors import Unavailable
from services.common.rpc_errors import error_from_rpc
from services.optimizer.api.convert import (
    evaluation_from_proto,
    evaluation_request_to_proto,
    job_event_from_proto,
    job_to_proto,
    trainer_state_from_proto,
)
from services.optimizer.core.ports import (
    Evaluation,
    EvaluationRequest,
    JobEvent,
    JudgeModel,
    TrainerState,
    TrainingJob,
)

START_TIMEOUT = 120.0  # validation loads the dataset and the model's config
STATUS_TIMEOUT = 5.0


class Channels:
    """One long-lived channel per address (and per retry behaviour)."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}

    def get(self, address: str, *, retries: bool = True) -> grpc.aio.Channel:
        """The channel to `address`, created on first use.

        `retries=False`: gRPC's own retry of UNAVAILABLE is off, for a caller that retries
        (and counts the refusals) itself.
        """
        key = (address, retries)
        channel = self._channels.get(key)
        if channel is None:
            settings = self._settings if retries else replace(self._settings, max_attempts=1)
            channel = create_channel(address, settings)
            self._channels[key] = channel
        return channel

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()


class GrpcTrainers:
    """TrainerService over gRPC."""

    def __init__(self, channels: Channels) -> None:
        self._channels = channels

    def _stub(self, address: str) -> trainer_pb2_grpc.TrainerServiceAsyncStub:
        return trainer_pb2_grpc.TrainerServiceStub(self._channels.get(address))  # type: ignore[return-value]

    async def start(self, address: str, job: TrainingJob) -> None:
        """Starts the job on the trainer at `address`."""
        try:
            await self._stub(address).StartTraining(job_to_proto(job), timeout=START_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, f"trainer {address}") from None

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events, replayed from the first."""
        call = self._stub(address).WatchTraining(trainer_pb2.WatchTrainingRequest(job_id=job_id))
        try:
            async for message in call:
                event = job_event_from_proto(message)
                if event is not None:
                    yield event
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, f"trainer {address}") from None
        finally:
            call.cancel()

    async def cancel(self, address: str, job_id: str) -> None:
        """Asks the trainer to stop the job; failures are ignored (the trial ends anyway)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub(address).CancelTraining(
                trainer_pb2.CancelTrainingRequest(job_id=job_id), timeout=STATUS_TIMEOUT
            )

    async def status(self, address: str) -> TrainerState | None:
        """The trainer's state, or None when unreachable."""
        try:
            response: trainer_pb2.GetTrainerStatusResponse = await self._stub(
                address
            ).GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(), timeout=STATUS_TIMEOUT)
        except grpc.aio.AioRpcError:
            return None
        return trainer_state_from_proto(response)


class GrpcEvaluator:
    """EvaluatorService over gRPC."""

    def __init__(self, channels: Channels, address: str) -> None:
        self._channels = channels
        self._address = address

    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        """Scores one evaluation point."""
        if not self._address:
            raise Unavailable("no evaluator configured (set LORATUNE_EVALUATOR_ADDRESS)")
        # No hidden retries: Scoring retries an UNAVAILABLE evaluation itself, with its own
        # backoff and budget, and counts each refusal on the trial. Under gRPC's retries, each
        # refusal would have re-run BERTScore and the judge up to four times in two seconds.
        channel = self._channels.get(self._address, retries=False)
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        try:
            response = await stub.Evaluate(evaluation_request_to_proto(request), timeout=600)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, "evaluator") from None
        return evaluation_from_proto(response.result)


class GrpcJudgeCatalog:
    """JudgeGatewayService.ListJudgeModels over gRPC."""

    def __init__(self, channels: Channels, address: str) -> None:
        self._channels = channels
        self._address = address

    async def models(self) -> list[JudgeModel]:
        """Registered judge models and whether each has credentials."""
        if not self._address:
            raise Unavailable("no judge gateway configured (set LORATUNE_JUDGE_ADDRESS)")
        stub = judge_pb2_grpc.JudgeGatewayServiceStub(self._channels.get(self._address))
        try:
            reply = await stub.ListJudgeModels(judge_pb2.ListJudgeModelsRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, "judge gateway") from None
        return [JudgeModel(m.id, m.available, m.is_default) for m in reply.models]


class StaticTrainers:
    """A fixed list of trainer addresses (LORATUNE_TRAINERS)."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = list(addresses)

    async def addresses(self) -> list[str]:
        """The configured addresses."""
        return list(self._addresses)

    async def mark(self, address: str, busy: bool) -> None:
        """Nothing to tell a fixed list."""
