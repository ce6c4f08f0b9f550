"""Nothing lost: a trainer dying mid-trial, the optimizer SIGKILLed mid-study, PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.main import build_evaluator
from services.evaluator.main import service_definition as evaluator_definition
from services.optimizer.config import OptimizerSettings
from services.optimizer.main import build_optimizer
from services.optimizer.main import service_definition as optimizer_definition
from services.trainer.config import TrainerSettings
from services.trainer.main import build_manager
from services.trainer.main import service_definition as trainer_definition
from tests.integration import postgres as postgres_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FINISHED = (optimizer_pb2.TRIAL_STATE_COMPLETE, optimizer_pb2.TRIAL_STATE_PRUNED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    dataset: Path, model: Path, name: str, epochs: int = 2
) -> optimizer_pb2.CreateStudyRequest:
    return optimizer_pb2.CreateStudyRequest(
        project_id=7,
        study_name=name,
        fine_tuning_params=optimizer_pb2.FineTuningParams(base_model_name=str(model), n_trials=5),
        dataset=common_pb2.DatasetSpec(
            uri=str(dataset), task_type=common_pb2.TASK_TYPE_CLASSIFICATION, seed=1
        ),
        search_space=optimizer_pb2.SearchSpace(
            rank=[4],
            num_epochs=[epochs],
            learning_rate=optimizer_pb2.FloatRange(low=1e-3, high=1e-2, log=True),
        ),
        training=common_pb2.TrainingParams(batch_size=2, max_seq_length=16),
        pruner="none",
    )


async def start_trainer(root: Path) -> RunningServer:
    settings = TrainerSettings(artifact_root=root, trainer_progress_every_steps=1)
    return await start_server(
        [trainer_definition(build_manager(settings), settings, TrainingDefaults())],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )


async def start_evaluator() -> RunningServer:
    return await start_server(
        [evaluator_definition(build_evaluator(EvaluatorSettings()))],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )


async def wait_finished(stub: Any, study_id: str, timeout: float = 300) -> optimizer_pb2.Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = (
                await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_id), timeout=5)
            ).study
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.5)
            continue
        if study.state not in (optimizer_pb2.STUDY_STATE_QUEUED, optimizer_pb2.STUDY_STATE_RUNNING):
            return study
        await asyncio.sleep(0.5)
    raise AssertionError(f"study {study_id} did not finish in {timeout} s")


async def test_trainer_lost_mid_trial_is_retried_elsewhere(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path
) -> None:
    first, second = await start_trainer(tmp_path / "runs"), await start_trainer(tmp_path / "runs")
    evaluator = await start_evaluator()
    optimizer, channels = build_optimizer(
        OptimizerSettings(
            trainers=f"{first.address},{second.address}",
            evaluator_address=evaluator.address,
            artifact_root=tmp_path / "runs",
            poll_seconds=0.2,
        ),
        TrainingDefaults(),
        ClientSettings(max_attempts=1),
    )
    server = await start_server(
        [optimizer_definition(optimizer, channels)],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            await stub.CreateStudy(request(sentiment, tiny_qwen, "lost", epochs=3))
            async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="lost")):
                started = event.trial_started.trial if event.HasField("trial_started") else None
                if started is not None and started.trainer == first.address:
                    break
            await first.stop(0)  # the trainer pod dies mid-trial
            study = await wait_finished(stub, "lost")
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="lost"))
            ).trials
    finally:
        await server.stop(1)
        await second.stop(1)
        await evaluator.stop(1)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert sum(t.state in FINISHED for t in trials) == 5 == len(trials)
    assert study.trials_failed == 0  # a trainer that died is not the trial's fault
    rerun = [t for t in trials if t.interruptions]
    assert len(rerun) == 1 and rerun[0].attempt == 2
    assert first.address in rerun[0].interruptions[0] and rerun[0].trainer == second.address


def _optimizer_process(port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "optimizer",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
async def test_optimizer_sigkill_mid_study_resumes_from_storage(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path
) -> None:
    trainer = await start_trainer(tmp_path / "runs")
    evaluator = await start_evaluator()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORATUNE_TRAINERS=trainer.address,
        LORATUNE_EVALUATOR_ADDRESS=evaluator.address,
        LORATUNE_ARTIFACT_ROOT=str(tmp_path / "runs"),
        LORATUNE_STORAGE_URL=f"sqlite:///{tmp_path / 'optuna.db'}",
        LORATUNE_POLL_SECONDS="0.2",
    )
    port = free_port()
    first = _optimizer_process(port, env)
    procs = [first]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    await stub.CreateStudy(
                        request(sentiment, tiny_qwen, "kill", epochs=3), timeout=30
                    )
                    break
                except grpc.aio.AioRpcError:
                    assert time.monotonic() < deadline, "optimizer never came up"
                    await asyncio.sleep(0.3)
            async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="kill")):
                if event.HasField("trial_started") and event.trial_started.trial.number >= 1:
                    break
        first.send_signal(signal.SIGKILL)  # no chance to clean up
        first.wait(10)
        port = free_port()
        second = _optimizer_process(port, env)
        procs.append(second)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            study = await wait_finished(stub, "kill")
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="kill"))
            ).trials
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await trainer.stop(1)
        await evaluator.stop(1)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    # A restarted sampler, seeded as before, may propose again what the killed process
    # proposed: that repeat takes the finished trial's result (same_as), runs no job and is
    # not counted. Exactly n_trials ran their own job, none counted twice.
    finished = [t for t in trials if t.state in FINISHED and not t.HasField("same_as")]
    seen = [(t.number, t.state, t.attempt, t.same_as) for t in trials]
    assert len(finished) == 5, seen
    assert len({t.number for t in finished}) == 5
    assert Path(study.best_model_dir, "study.json").is_file()


@pytest.fixture
def postgres() -> Iterator[str]:
    """A real PostgreSQL server in a temporary folder; yields its SQLAlchemy URL."""
    if not postgres_helper.available():
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    with postgres_helper.postgres_server() as url:
        yield url


async def test_study_on_postgresql(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path, postgres: str
) -> None:
    trainer = await start_trainer(tmp_path / "runs")
    evaluator = await start_evaluator()
    optimizer, channels = build_optimizer(
        OptimizerSettings(
            trainers=trainer.address,
            evaluator_address=evaluator.address,
            artifact_root=tmp_path / "runs",
            storage_url=postgres,
            poll_seconds=0.2,
        ),
        TrainingDefaults(),
        ClientSettings(),
    )
    server = await start_server(
        [optimizer_definition(optimizer, channels)],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            await stub.CreateStudy(request(sentiment, tiny_qwen, "pg", epochs=1))
            study = await wait_finished(stub, "pg")
    finally:
        await server.stop(1)
        await trainer.stop(1)
        await evaluator.stop(1)
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert study.trials_complete + study.trials_pruned == 5
    import optuna

    stored = optuna.load_study(study_name="pg", storage=postgres)
    assert len([t for t in stored.trials if t.state.is_finished()]) >= 5
