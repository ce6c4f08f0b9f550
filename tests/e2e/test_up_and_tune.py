"""`loratune up` as a process, a study submitted by `loratune tune --optimizer`, then Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.unit.trainer.conftest import build_tiny_qwen

OPTIMIZER = "loratune.optimizer.v1.OptimizerService"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_serving(address: str, service: str, proc: subprocess.Popen[Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, "loratune up exited before serving"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{service} never became SERVING"
            time.sleep(0.2)


@dataclass(frozen=True)
class UpProcess:
    """`loratune up` started by a test: the process, its ports, its environment and log."""

    process: subprocess.Popen[Any]
    optimizer: int
    trainer: int
    evaluator: int
    judge: int
    web: int
    env: dict[str, str]
    log: Path

    @property
    def address(self) -> str:
        """The optimizer's address."""
        return f"127.0.0.1:{self.optimizer}"


def start_up(
    folder: Path, *, metrics_port_base: int = -1, extra_env: dict[str, str] | None = None
) -> UpProcess:
    """`loratune up` on free ports, offline, artifacts in ``folder / "runs"``, its log in
    ``folder / "up.log"`` (a pipe nobody reads until the end fills up and blocks it)."""
    optimizer, trainer, evaluator, judge, web = free_ports(5)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        LORATUNE_GRACE_PERIOD_SECONDS="5",
        COLUMNS="200",
        **(extra_env or {}),
    )
    for name in ("LORATUNE_OPTIMIZER_ADDRESS", "LORATUNE_AUTH_TOKEN"):
        env.pop(name, None)
    log = folder / "up.log"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "services.cli.main", "up"),
            *("--optimizer-port", str(optimizer), "--trainer-port", str(trainer)),
            *("--evaluator-port", str(evaluator), "--judge-port", str(judge)),
            *("--console-port", str(web), "--metrics-port-base", str(metrics_port_base)),
            *("--artifact-root", str(folder / "runs")),
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return UpProcess(process, optimizer, trainer, evaluator, judge, web, env, log)


@pytest.mark.slow
def test_up_serves_a_study_from_tune_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    model = build_tiny_qwen(tmp_path / "tiny-qwen3")
    words = ["good", "great", "bad", "awful"]
    data = tmp_path / "sentiment.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"w{i % 7} {words[i % 4]}", "label": "pos" if i % 4 < 2 else "neg"})
            + "\n"
            for i in range(24)
        )
    )
    root = tmp_path / "runs"
    started = start_up(tmp_path)
    up, env, log, address = started.process, started.env, started.log, started.address
    try:
        wait_serving(address, OPTIMIZER, up, 60)
        tune = subprocess.run(
            [
                *(sys.executable, "-m", "services.cli.main", "tune"),
                *("--optimizer", address, "--dataset", str(data), "--task", "classification"),
                *("--base-model", str(model), "--n-trials", "5", "--study-name", "e2e"),
                *("--epochs", "1", "--ranks", "4", "--learning-rate", "1e-3,1e-2"),
                *("--max-seq-length", "16", "--batch-size", "4", "--validation-fraction", "0.25"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert tune.returncode == 0, tune.stdout + tune.stderr
        published = root / "models" / "e2e"
        assert f"best adapter published to {published.resolve()}" in tune.stdout
        assert "Trials of e2e" in tune.stdout and "study e2e: COMPLETED" in tune.stdout
        assert (published / "adapter_model.safetensors").is_file()
        assert (root / "optuna.db").is_file()
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
    except BaseException:
        up.kill()
        up.wait()
        print(log.read_text())
        raise
    output = log.read_text()
    assert up.returncode == 0, output
    for port in (started.optimizer, started.trainer, started.evaluator, started.judge):
        assert f"127.0.0.1:{port}" in output  # the table of addresses
    assert "SIGINT received; stopping" in output
    assert f"web console: http://127.0.0.1:{started.web}/" in output  # `up` serves the console too
