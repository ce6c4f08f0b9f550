"""`loratune serve trainer` as a process: serves a job, and SIGTERM mid-job exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.common.v1 import common_pb2
from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.evaluator.core.bertscore import packaged_minilm_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trainer_process_trains_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"row {i} {'refund' if i % 2 else 'card'}", "label": str(i % 2)})
            + "\n"
            for i in range(40)
        )
    )
    port = free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORATUNE_ARTIFACT_ROOT=str(tmp_path / "runs"),
        LORATUNE_GRACE_PERIOD_SECONDS="10",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "trainer",
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
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service="loratune.trainer.v1.TrainerService"),
                        timeout=1,
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "trainer never became SERVING"
                time.sleep(0.2)
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            stub.StartTraining(
                trainer_pb2.StartTrainingRequest(
                    job_id="long",
                    base_model=packaged_minilm_path(),
                    dataset=common_pb2.DatasetSpec(
                        uri=str(data), task_type=common_pb2.TASK_TYPE_CLASSIFICATION
                    ),
                    hyperparameters=common_pb2.Hyperparameters(
                        lora=common_pb2.LoraParams(rank=4, alpha=8),
                        training=common_pb2.TrainingParams(
                            learning_rate=1e-3, num_epochs=100, batch_size=2, max_seq_length=16
                        ),
                    ),
                ),
                timeout=60,
            )
            events = stub.WatchTraining(
                trainer_pb2.WatchTrainingRequest(job_id="long"), timeout=120
            )
            for event in events:
                if event.WhichOneof("event") == "progress":
                    break
            proc.send_signal(signal.SIGTERM)
            # The stream stays open until the job has stopped, and says why it stopped.
            last = None
            for event in events:
                last = event
        output, _ = proc.communicate(timeout=30)
    except BaseException:
        proc.kill()
        print(proc.communicate()[0])
        raise
    assert proc.returncode == 0, output
    assert last is not None and last.WhichOneof("event") == "failed", output
    assert last.failed.reason == trainer_pb2.FAILURE_REASON_SHUTDOWN
    assert "stopping job long: the trainer is shutting down" in output
