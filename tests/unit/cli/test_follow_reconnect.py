"""`loratune tune --wait` / `watch` follow a study across an optimizer restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from loratune.optimizer.v1 import optimizer_pb2
from services.cli import optimizer_commands
from services.cli.optimizer_commands import follow_study

RUNNING = optimizer_pb2.Study(
    study_id="s1",
    state=optimizer_pb2.STUDY_STATE_RUNNING,
    fine_tuning_params=optimizer_pb2.FineTuningParams(n_trials=5),
)
DONE = optimizer_pb2.Study(
    study_id="s1",
    state=optimizer_pb2.STUDY_STATE_COMPLETED,
    fine_tuning_params=optimizer_pb2.FineTuningParams(n_trials=5),
)


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection refused"
    )


class RestartingOptimizer:
    """Answers, goes away mid-stream, refuses a call while down, then streams the end."""

    def __init__(self) -> None:
        self.watches = 0
        self.gets = 0

    async def GetStudy(self, request: Any) -> optimizer_pb2.GetStudyResponse:
        self.gets += 1
        if self.gets == 2:  # while it restarts
            raise unavailable()
        return optimizer_pb2.GetStudyResponse(study=RUNNING)

    async def ListTrials(self, request: Any) -> optimizer_pb2.ListTrialsResponse:
        return optimizer_pb2.ListTrialsResponse()

    def WatchStudy(self, request: Any) -> AsyncIterator[optimizer_pb2.StudyEvent]:
        self.watches += 1
        first = self.watches == 1

        async def events() -> AsyncIterator[optimizer_pb2.StudyEvent]:
            if first:
                raise unavailable()
            yield optimizer_pb2.StudyEvent(study_finished=optimizer_pb2.StudyFinished(study=DONE))

        return events()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimizer_commands, "RECONNECT_SECONDS", (0.01, 0.02))


async def test_a_restarted_optimizer_is_followed_to_the_studys_end() -> None:
    stub = RestartingOptimizer()
    final = await follow_study(stub, "s1", reconnect=True)  # type: ignore[arg-type]
    assert final.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert stub.watches == 2 and stub.gets == 3


async def test_without_reconnect_the_lost_optimizer_is_an_error() -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await follow_study(RestartingOptimizer(), "s1")  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_other_errors_are_not_retried() -> None:
    class Missing(RestartingOptimizer):
        async def GetStudy(self, request: Any) -> optimizer_pb2.GetStudyResponse:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no s1"
            )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await follow_study(Missing(), "s1", reconnect=True)  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_wait_needs_a_remote_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    monkeypatch.delenv("LORATUNE_OPTIMIZER_ADDRESS", raising=False)
    result = CliRunner().invoke(
        app, ["tune", "--dataset", "x.jsonl", "--task", "classification", "--no-wait"]
    )
    assert result.exit_code == 2
    assert "--no-wait needs --optimizer" in result.output
