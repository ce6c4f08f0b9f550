"""A trainer stopped mid-trial (SIGTERM: a drain, a rolling update) costs the study nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.optimizer.config import OptimizerSettings
from services.optimizer.main import build_optimizer
from services.optimizer.main import service_definition as optimizer_definition
from tests.integration.test_optimizer_resilience import (
    FINISHED,
    free_port,
    request,
    start_evaluator,
    wait_finished,
)


def _trainer_process(port: int, root: Path) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORATUNE_ARTIFACT_ROOT=str(root),
        LORATUNE_GRACE_PERIOD_SECONDS="20",
        LORATUNE_TRAINER_PROGRESS_EVERY_STEPS="1",
        OMP_NUM_THREADS="1",
    )
    command = [sys.executable, "-m", "services.cli.main", "serve", "trainer"]
    return subprocess.Popen(
        [*command, "--port", str(port), "--metrics-port", "-1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_serving(address: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"trainer {address} never became SERVING"
            time.sleep(0.3)


@pytest.mark.slow
async def test_sigterm_to_a_trainer_mid_trial_reruns_the_trial_elsewhere_uncounted(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path
) -> None:
    root = tmp_path / "runs"
    ports = [free_port(), free_port()]
    procs = [_trainer_process(port, root) for port in ports]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    evaluator = await start_evaluator()
    server = None
    try:
        for address in addresses:
            _wait_serving(address)
        optimizer, channels = build_optimizer(
            OptimizerSettings(
                trainers=",".join(addresses),
                evaluator_address=evaluator.address,
                artifact_root=root,
                poll_seconds=0.2,
                max_trial_failures=1,  # a single counted failure would end the study FAILED
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
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            await stub.CreateStudy(request(sentiment, tiny_qwen, "drain", epochs=4))
            victim = None
            stopped_at = 0.0
            async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id="drain")):
                started = event.trial_started.trial if event.HasField("trial_started") else None
                if started is not None and started.trainer == addresses[0]:
                    victim = started.number
                if (
                    victim is not None
                    and event.HasField("trial_progress")
                    and event.trial_progress.number == victim
                    and event.trial_progress.step >= 2
                ):
                    stopped_at = time.monotonic()
                    procs[0].send_signal(signal.SIGTERM)  # the pod is drained mid-trial
                    break
            assert victim is not None
            output, _ = procs[0].communicate(timeout=60)
            stop_seconds = time.monotonic() - stopped_at
            study = await wait_finished(stub, "drain")
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="drain"))
            ).trials
    finally:
        if server is not None:
            await server.stop(1)
        await evaluator.stop(1)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    assert procs[0].returncode == 0, output
    assert "the trainer is shutting down" in output
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert study.trials_failed == 0
    finished = [t for t in trials if t.state in FINISHED]
    assert len(trials) == len(finished) == 5  # exactly n_trials, none failed or doubled
    rerun = trials[victim]
    assert rerun.attempt == 2 and len(rerun.interruptions) == 1
    assert "shut down" in rerun.interruptions[0]
    assert rerun.trainer == addresses[1]  # ran again on the trainer that stayed
    print(f"trainer stopped {stop_seconds:.1f} s after SIGTERM; trial {victim} re-ran")
