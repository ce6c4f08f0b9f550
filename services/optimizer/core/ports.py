"""What the optimizer needs of trainers, the evaluator and the judge gateway.

The messages are the contract's protobufs (plain data, no transport); the adapters in
`services/optimizer/clients.py` speak gRPC and raise the common domain errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from loratune.trainer.v1 import trainer_pb2


class TrainerPort(Protocol):
    """Trainers by address."""

    async def start(self, address: str, request: trainer_pb2.StartTrainingRequest) -> None:
        """Starts a job (RESOURCE_EXHAUSTED when busy, UNAVAILABLE when unreachable)."""
        ...

    def watch(self, address: str, job_id: str) -> AsyncIterator[trainer_pb2.TrainingEvent]:
        """The job's events from the first (NOT_FOUND after a trainer restart)."""
        ...

    async def cancel(self, address: str, job_id: str) -> None:
        """Stops a job; an unknown job or an unreachable trainer is not an error here."""
        ...

    async def status(self, address: str) -> trainer_pb2.GetTrainerStatusResponse | None:
        """The trainer's status, or None when it cannot be reached."""
        ...


class EvaluatorPort(Protocol):
    """The evaluator."""

    async def evaluate(self, request: evaluator_pb2.EvaluateRequest) -> common_pb2.EvaluationResult:
        """Scores one evaluation point (UNAVAILABLE when it cannot be reached)."""
        ...


@dataclass(frozen=True)
class JudgeModel:
    """A judge model the gateway knows."""

    id: str
    available: bool  # its provider's credentials are configured
    is_default: bool = False


class JudgeCatalog(Protocol):
    """The judge gateway's registry, to check a study's judge at creation."""

    async def models(self) -> list[JudgeModel]:
        """Registered judge models."""
        ...


class TrainerDiscovery(Protocol):
    """Where the trainers are."""

    async def addresses(self) -> list[str]:
        """Addresses of the trainers that exist now (ready pods, or the static list)."""
        ...
