"""What the optimizer needs of trainers, the evaluator and the judge gateway, in domain terms.

The adapters in `services/optimizer/clients.py` speak gRPC, convert these types to and
from the contract's messages and raise the common domain errors; the core sees no
protobuf.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.optimizer.core.records import DatasetRef, Hyperparameters


@dataclass(frozen=True)
class TrainingJob:
    """One trial's job, as a trainer takes it."""

    job_id: str
    base_model: str
    dataset: DatasetRef
    hyperparameters: Hyperparameters
    output_dir: str
    max_eval_samples: int = 0


@dataclass(frozen=True)
class JobProgress:
    """Steps done."""

    epoch: float
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class JobEvaluation:
    """Validation predictions after an epoch, and where that epoch's adapter was saved."""

    epoch: float
    step: int
    eval_loss: float
    predictions: Sequence[str]
    references: Sequence[str]
    prompts: Sequence[str] = ()
    labels: Sequence[str] = ()
    adapter_dir: str = ""


@dataclass(frozen=True)
class ExcludedClass:
    """A class the job did not train on, with its row counts."""

    label: str
    train_rows: int
    validation_rows: int


@dataclass(frozen=True)
class JobDataPrepared:
    """The data as the trainer prepared it."""

    excluded: Sequence[ExcludedClass] = ()


@dataclass(frozen=True)
class JobCompleted:
    """The job ended and its adapter is saved."""

    artifact_dir: str


@dataclass(frozen=True)
class JobFailed:
    """The job ended without an adapter.

    `reason`: OUT_OF_MEMORY, NAN_LOSS, INVALID_INPUT, CANCELLED, INTERNAL or SHUTDOWN (the
    trainer itself is stopping: not the job's fault).
    """

    reason: str
    message: str


JobEvent = JobProgress | JobEvaluation | JobDataPrepared | JobCompleted | JobFailed


@dataclass(frozen=True)
class TrainerState:
    """What the pool needs to know of a trainer."""

    busy: bool
    shutting_down: bool = False


@dataclass(frozen=True)
class JudgeOptions:
    """The LLM judge's part of an evaluation."""

    enabled: bool
    judge_model_id: str = ""
    sample_size: int = 0
    seed: int = 0


@dataclass(frozen=True)
class EvaluationRequest:
    """One epoch's predictions to score."""

    classification: bool
    predictions: Sequence[str]
    references: Sequence[str]
    prompts: Sequence[str] = ()
    labels: Sequence[str] = ()
    judge: JudgeOptions | None = None


@dataclass(frozen=True)
class Evaluation:
    """The evaluator's answer: the objective, a few figures for the log, the whole document.

    `document` is the full result as the contract's JSON (what `evaluation_results.json`
    holds and what the API turns back into an EvaluationResult).
    """

    objective: float
    objective_name: str
    figures: Mapping[str, float] = field(default_factory=dict)
    document: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeModel:
    """A judge model the gateway knows."""

    id: str
    available: bool  # its provider's credentials are configured
    is_default: bool = False


class TrainerPort(Protocol):
    """Trainers by address."""

    async def start(self, address: str, job: TrainingJob) -> None:
        """Starts a job (ResourceExhausted when busy, Unavailable when unreachable)."""
        ...

    def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events from the first (NotFound after a trainer restart)."""
        ...

    async def cancel(self, address: str, job_id: str) -> None:
        """Stops a job; an unknown job or an unreachable trainer is not an error here."""
        ...

    async def status(self, address: str) -> TrainerState | None:
        """The trainer's state, or None when it cannot be reached."""
        ...


class EvaluatorPort(Protocol):
    """The evaluator."""

    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        """Scores one evaluation point (Unavailable when it cannot be reached)."""
        ...


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

    async def mark(self, address: str, busy: bool) -> None:
        """Says whether the trainer at `address` runs a job (Kubernetes: its pod's deletion
        cost, so that scaling in removes idle trainers first); may do nothing."""
        ...
