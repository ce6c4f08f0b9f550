"""The trainer's job manager: one job at a time, an event log per job, replay and follow."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.logging import redact
from services.common.names import excerpt
from services.trainer import metrics
from services.trainer.core.types import (
    BaseModelInfo,
    Cancelled,
    CompletedEvent,
    Event,
    FailedEvent,
    FailureReason,
    JobSpec,
    NanLoss,
    ProgressEvent,
    RunContext,
)

logger = logging.getLogger(__name__)


class JobState(enum.Enum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class EventRecord:
    """One event of a job's log."""

    sequence: int
    time: datetime
    event: Event


@dataclass(frozen=True)
class TrainerStatus:
    """What GetTrainerStatus reports."""

    device: str
    device_name: str
    busy: bool
    current_job_id: str
    loaded_base_model: str
    memory_allocated_bytes: int
    memory_reserved_bytes: int
    memory_total_bytes: int
    shutting_down: bool = False
    # What `loaded_base_model` was loaded from (a GGUF file, de-quantised, ...); None = none.
    loaded_base: BaseModelInfo | None = None


class JobRunner(Protocol):
    """The work behind a job: validation before acceptance, then the run (worker threads)."""

    def validate(self, spec: JobSpec) -> Any:
        """Checks everything that can be checked before accepting; returns what run needs."""
        ...

    def run(self, spec: JobSpec, prepared: Any, ctx: RunContext) -> CompletedEvent:
        """Trains; raises Cancelled, NanLoss, InvalidArgument, or an out-of-memory error."""
        ...

    def failure_of(self, error: BaseException) -> FailureReason:
        """Classifies an unexpected error (OUT_OF_MEMORY or INTERNAL) and frees what it can."""
        ...

    def healthy(self) -> bool:
        """False when the accelerator is in a state only a restart can fix."""
        ...

    def device_status(self) -> dict[str, Any]:
        """device, device_name, loaded_base_model, loaded_base (a BaseModelInfo or None)
        and memory figures."""
        ...


@dataclass
class Job:
    """A job and its event log."""

    spec: JobSpec
    state: JobState = JobState.PENDING
    create_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    records: list[EventRecord] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    # Set with cancel_requested when the trainer itself stops: the job ends as SHUTDOWN.
    shutdown_requested: threading.Event = field(default_factory=threading.Event)
    _waiters: set[asyncio.Event] = field(default_factory=set)

    def append(self, event: Event) -> None:
        """Adds an event (on the event loop) and wakes every watcher."""
        self.records.append(EventRecord(len(self.records), datetime.now(UTC), event))
        for waiter in self._waiters:
            waiter.set()

    def _finish(self, state: JobState, event: Event) -> None:
        self.state = state
        self.append(event)


class JobManager:
    """Accepts one job at a time, runs it off the event loop, keeps its events for watchers."""

    def __init__(
        self,
        runner: JobRunner,
        *,
        jobs_kept: int = 64,
        progress_every_steps: int = 5,
        on_unhealthy: Callable[[], None] | None = None,
    ) -> None:
        self._runner = runner
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_kept = jobs_kept
        self._progress_every = progress_every_steps
        self._current: str | None = None  # the job being validated or run
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.on_unhealthy = on_unhealthy

    @property
    def stopping(self) -> bool:
        """Whether shutdown has begun (no new job is accepted)."""
        return self._stopping

    @property
    def busy(self) -> bool:
        """Whether a job is being validated or run."""
        return self._current is not None

    def get(self, job_id: str) -> Job:
        """The job, or NOT_FOUND (a restarted trainer knows no jobs)."""
        if not job_id:
            raise InvalidArgument("must not be empty", field="job_id")
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job '{job_id}' on this trainer (it may have restarted)")
        return job

    async def start(self, spec: JobSpec) -> Job:
        """Validates and accepts a job, answering at once; the same id again is idempotent."""
        if not spec.job_id:
            raise InvalidArgument("must not be empty", field="job_id")
        existing = self._jobs.get(spec.job_id)
        if existing is not None:
            return existing
        if self._stopping:
            raise Unavailable("the trainer is shutting down; send the job to another trainer")
        if self._current is not None:
            raise ResourceExhausted(
                f"the trainer is busy with job '{self._current}'; send the job to an idle "
                "trainer or retry when it ends"
            )
        self._current = spec.job_id  # claimed before validation, so a second start is refused
        try:
            prepared = await asyncio.to_thread(self._runner.validate, spec)
        except BaseException:
            self._current = None
            raise
        job = Job(spec)
        self._jobs[spec.job_id] = job
        self._trim()
        self._tasks[spec.job_id] = asyncio.create_task(self._run(job, prepared))
        logger.info("accepted job %s (base model %s)", spec.job_id, spec.base_model)
        return job

    async def _run(self, job: Job, prepared: Any) -> None:
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:
            if isinstance(event, ProgressEvent):
                metrics.SAMPLES_PER_SECOND.set(event.samples_per_second)
            loop.call_soon_threadsafe(job.append, event)

        ctx = RunContext(
            emit=emit,
            should_stop=job.cancel_requested.is_set,
            progress_every_steps=self._progress_every,
        )
        job.state = JobState.RUNNING
        metrics.BUSY.set(1)
        metrics.CLOCK.set_busy(True)
        outcome = "failed"
        try:
            completed = await asyncio.to_thread(self._runner.run, job.spec, prepared, ctx)
        except Cancelled:
            if job.shutdown_requested.is_set():
                outcome = "shutdown"
                job._finish(
                    JobState.FAILED,
                    FailedEvent(
                        FailureReason.SHUTDOWN,
                        "the trainer is shutting down; the job stopped between steps",
                    ),
                )
            else:
                outcome = "cancelled"
                job._finish(
                    JobState.CANCELLED,
                    FailedEvent(FailureReason.CANCELLED, "cancelled by a client"),
                )
        except NanLoss as err:
            job._finish(JobState.FAILED, FailedEvent(FailureReason.NAN_LOSS, str(err)))
        except InvalidArgument as err:
            job._finish(JobState.FAILED, FailedEvent(FailureReason.INVALID_INPUT, str(err)))
        except Exception as err:
            reason = self._runner.failure_of(err)
            if reason is FailureReason.OUT_OF_MEMORY:
                message = f"out of memory: {err}".splitlines()[0][:500]
                logger.warning("job %s: %s", job.spec.job_id, message)
            else:
                logger.exception("job %s failed", job.spec.job_id)
                # The error's own first line (escaped, bounded): what a client shows as the
                # trial's and the study's failure; the traceback stays in this log.
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                message = excerpt(
                    redact(f"internal error ({type(err).__name__}: {first}); see the trainer's log")
                    if first
                    else f"internal error ({type(err).__name__}); see the trainer's log",
                    500,
                )
            job._finish(JobState.FAILED, FailedEvent(reason, message))
            if not self._runner.healthy():
                logger.error("the accelerator is broken; reporting NOT_SERVING for a restart")
                if self.on_unhealthy is not None:
                    self.on_unhealthy()
        else:
            outcome = "completed"
            job._finish(JobState.COMPLETED, completed)
        finally:
            metrics.BUSY.set(0)
            metrics.CLOCK.set_busy(False)
            metrics.SAMPLES_PER_SECOND.set(0)
            metrics.JOBS.labels(outcome=outcome).inc()
            self._current = None
            self._tasks.pop(job.spec.job_id, None)
            self._update_memory()
        logger.info("job %s ended: %s", job.spec.job_id, job.state.value)

    async def watch(self, job_id: str) -> AsyncIterator[EventRecord]:
        """Replays the job's events so far, then follows it until it ends."""
        job = self.get(job_id)
        waiter = asyncio.Event()
        job._waiters.add(waiter)
        try:
            sent = 0
            while True:
                waiter.clear()
                while sent < len(job.records):
                    yield job.records[sent]
                    sent += 1
                if job.state.terminal and sent >= len(job.records):
                    return
                await waiter.wait()
        finally:
            job._waiters.discard(waiter)

    async def cancel(self, job_id: str) -> Job:
        """Asks a running job to stop between steps; an ended job is returned as it is."""
        job = self.get(job_id)
        if not job.state.terminal:
            job.cancel_requested.set()
            logger.info("cancelling job %s", job_id)
        return job

    async def wait(self, job_id: str) -> Job:
        """Waits until the job ends (tests, shutdown)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)
        return self.get(job_id)

    def status(self) -> TrainerStatus:
        """Device, current job and memory."""
        info = self._runner.device_status()
        running = self._current if self._current in self._jobs else None
        loaded_base = info.get("loaded_base")
        return TrainerStatus(
            device=str(info.get("device", "cpu")),
            device_name=str(info.get("device_name", "")),
            busy=running is not None,
            current_job_id=running or "",
            loaded_base_model=str(info.get("loaded_base_model", "")),
            memory_allocated_bytes=int(info.get("memory_allocated_bytes", 0)),
            memory_reserved_bytes=int(info.get("memory_reserved_bytes", 0)),
            memory_total_bytes=int(info.get("memory_total_bytes", 0)),
            shutting_down=self._stopping,
            loaded_base=loaded_base if isinstance(loaded_base, BaseModelInfo) else None,
        )

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking jobs, ends the running one as SHUTDOWN between steps, waits (bounded).

        Called when the trainer is told to stop (SIGTERM) while its server still answers, so
        watchers receive the SHUTDOWN event and run the job again elsewhere.
        """
        self._stopping = True
        for job_id, job in list(self._jobs.items()):
            if job_id in self._tasks and not job.state.terminal:
                job.shutdown_requested.set()
                job.cancel_requested.set()
                logger.info("stopping job %s: the trainer is shutting down", job_id)
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _update_memory(self) -> None:
        info = self._runner.device_status()
        for kind in ("allocated", "reserved", "total"):
            metrics.ACCELERATOR_MEMORY.labels(kind=kind).set(
                float(info.get(f"memory_{kind}_bytes", 0))
            )

    def _trim(self) -> None:
        while len(self._jobs) > self._jobs_kept:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.state.terminal:
                break
            del self._jobs[oldest_id]
