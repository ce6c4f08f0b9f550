"""The job manager with a fake runner: acceptance, busy, replay + follow, cancel, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.trainer.core.jobs import JobManager, JobState
from services.trainer.core.types import (
    BalancingSpec,
    Cancelled,
    CompletedEvent,
    DatasetSpec,
    FailedEvent,
    FailureReason,
    JobSpec,
    LoraSpec,
    NanLoss,
    ProgressEvent,
    RunContext,
    Task,
    TrainingSpec,
)


def spec(job_id: str = "job-1") -> JobSpec:
    return JobSpec(
        job_id=job_id,
        base_model="tiny",
        dataset=DatasetSpec(uri="data.jsonl", task=Task.CLASSIFICATION),
        lora=LoraSpec(),
        training=TrainingSpec(),
        balancing=BalancingSpec(),
        output_dir="/tmp/out",
    )


class FakeRunner:
    """Emits `steps` progress events, pausing on `gate` between them; scripted failures."""

    def __init__(self, steps: int = 5, fail: BaseException | None = None) -> None:
        self.steps = steps
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.invalid: str | None = None
        self.broken = False
        self.validated: list[str] = []

    def validate(self, spec: JobSpec) -> Any:
        self.validated.append(spec.job_id)
        if self.invalid:
            raise InvalidArgument("must be >= 1", field=self.invalid)
        return {"prepared": spec.job_id}

    def run(self, spec: JobSpec, prepared: Any, ctx: RunContext) -> CompletedEvent:
        for step in range(1, self.steps + 1):
            self.gate.wait(5)
            if ctx.should_stop():
                raise Cancelled
            if self.fail is not None and step == 3:
                raise self.fail
            ctx.emit(ProgressEvent(step / self.steps, step, self.steps, 1.0 / step, 1e-4, 10.0))
        return CompletedEvent(artifact_dir="/tmp/out", train_seconds=0.1)

    def failure_of(self, error: BaseException) -> FailureReason:
        return (
            FailureReason.OUT_OF_MEMORY
            if isinstance(error, MemoryError)
            else FailureReason.INTERNAL
        )

    def healthy(self) -> bool:
        return not self.broken

    def device_status(self) -> dict[str, Any]:
        return {"device": "cpu", "loaded_base_model": "tiny"}


async def collect(manager: JobManager, job_id: str) -> list[Any]:
    return [r.event async for r in manager.watch(job_id)]


async def test_runs_and_replays_everything_to_a_late_watcher() -> None:
    manager = JobManager(FakeRunner())
    job = await manager.start(spec())
    assert job.state in (JobState.PENDING, JobState.RUNNING)
    live = asyncio.create_task(collect(manager, "job-1"))
    await manager.wait("job-1")
    events = await live
    assert [type(e).__name__ for e in events] == ["ProgressEvent"] * 5 + ["CompletedEvent"]
    late = await collect(manager, "job-1")
    assert late == events
    assert [r.sequence for r in manager.get("job-1").records] == list(range(6))
    assert manager.get("job-1").state is JobState.COMPLETED and not manager.busy


async def test_busy_trainer_is_resource_exhausted_and_same_id_is_idempotent() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    manager = JobManager(runner)
    first = await manager.start(spec("a"))
    assert await manager.start(spec("a")) is first
    with pytest.raises(ResourceExhausted, match="busy with job 'a'"):
        await manager.start(spec("b"))
    assert manager.status().busy and manager.status().current_job_id == "a"
    runner.gate.set()
    await manager.wait("a")
    second = await manager.start(spec("b"))
    await manager.wait("b")
    assert second.state is JobState.COMPLETED


async def test_invalid_job_is_refused_before_acceptance_and_trainer_stays_free() -> None:
    runner = FakeRunner()
    runner.invalid = "hyperparameters.lora.rank"
    manager = JobManager(runner)
    with pytest.raises(InvalidArgument, match=r"hyperparameters\.lora\.rank"):
        await manager.start(spec("bad"))
    with pytest.raises(NotFound):
        manager.get("bad")
    runner.invalid = None
    await manager.start(spec("good"))
    assert (await manager.wait("good")).state is JobState.COMPLETED


async def test_cancel_stops_between_steps() -> None:
    runner = FakeRunner(steps=50)
    runner.gate.clear()
    manager = JobManager(runner)
    await manager.start(spec())
    started = time.monotonic()
    await manager.cancel("job-1")
    runner.gate.set()
    job = await manager.wait("job-1")
    assert time.monotonic() - started < 2
    assert job.state is JobState.CANCELLED
    last = job.records[-1].event
    assert isinstance(last, FailedEvent) and last.reason is FailureReason.CANCELLED
    assert sum(isinstance(r.event, ProgressEvent) for r in job.records) < 50


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NanLoss("loss is nan at step 3"), FailureReason.NAN_LOSS),
        (MemoryError("CUDA out of memory"), FailureReason.OUT_OF_MEMORY),
        (RuntimeError("boom"), FailureReason.INTERNAL),
        (InvalidArgument("bad rows", field="dataset.uri"), FailureReason.INVALID_INPUT),
    ],
)
async def test_failures_become_failed_events_and_trainer_stays_usable(
    error: BaseException, reason: FailureReason
) -> None:
    runner = FakeRunner(fail=error)
    manager = JobManager(runner)
    await manager.start(spec("x"))
    job = await manager.wait("x")
    last = job.records[-1].event
    assert job.state is JobState.FAILED
    assert isinstance(last, FailedEvent) and last.reason is reason
    if reason is FailureReason.INTERNAL:
        # The error's own words reach the client (the traceback stays in the log).
        assert last.message.startswith("internal error (RuntimeError: boom)")
    runner.fail = None
    await manager.start(spec("y"))
    assert (await manager.wait("y")).state is JobState.COMPLETED


async def test_broken_accelerator_reports_unhealthy() -> None:
    runner = FakeRunner(fail=RuntimeError("CUDA error: an illegal memory access"))
    runner.broken = True
    calls: list[int] = []
    manager = JobManager(runner, on_unhealthy=lambda: calls.append(1))
    await manager.start(spec())
    await manager.wait("job-1")
    assert calls == [1]


async def test_unknown_job_is_not_found() -> None:
    manager = JobManager(FakeRunner())
    with pytest.raises(NotFound, match="no job 'nope'"):
        await manager.cancel("nope")
    with pytest.raises(NotFound):
        await collect(manager, "nope")


async def test_an_internal_error_reaches_the_client_without_secrets_or_control_characters() -> None:
    from services.common.logging import register_secret

    register_secret("sk-live-4f9a8b7c6d5e")
    runner = FakeRunner(fail=RuntimeError("upstream said sk-live-4f9a8b7c6d5e\x1b[31m no\nmore"))
    manager = JobManager(runner)
    await manager.start(spec("y"))
    last = (await manager.wait("y")).records[-1].event
    assert isinstance(last, FailedEvent) and last.reason is FailureReason.INTERNAL
    assert "sk-live" not in last.message and "***" in last.message
    assert "\x1b" not in last.message and "more" not in last.message  # first line, escaped
