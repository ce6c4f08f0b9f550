"""`loratune serve evaluator` as a process: healthy, answers, has metrics, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.evaluator.core.bertscore import packaged_minilm_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="loratune.evaluator.v1.EvaluatorService"),
                    timeout=1,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError(f"evaluator at {address} never became SERVING")


def test_serve_evaluator_process_lifecycle() -> None:
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORATUNE_BERTSCORE_MODEL=packaged_minilm_path(),
        LORATUNE_BERTSCORE_LAYERS="6",
        LORATUNE_BERTSCORE_RESCALE="references",
        LORATUNE_LOG_FORMAT="json",
        LORATUNE_GRACE_PERIOD_SECONDS="5",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "evaluator",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, time.monotonic() + 60)
        with grpc.insecure_channel(address) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            response = stub.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    task_type=common_pb2.TASK_TYPE_GENERATION,
                    predictions=["<think>which card?</think>the card arrived", ""],
                    references=["my card has arrived", "where is my money"],
                ),
                timeout=120,
            )
            result = response.result
            assert result.bertscore.pairs == 2 and result.bertscore.empty_texts == 1
            assert 0 < result.objective < 1
            # LORATUNE_BERTSCORE_RESCALE=references: rescaled against the references.
            bert = result.bertscore
            assert response.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_REFERENCES
            assert "-rescaled-refs:" in bert.hash and bert.rescaled_with_baseline
            # The matching pair (twice the mean: the other pair is empty) beats "unrelated".
            assert 0 < bert.baseline_f1 < 2 * bert.raw_f1
            assert response.reasoning_stripped == 1
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'loratune_evaluator_evaluations_total{task_type="generation"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    except BaseException:
        proc.kill()
        print(proc.communicate()[0])
        raise
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output
    assert "Detailed evaluation: BERTScore=" in output
    assert "1 of 2 predictions had a reasoning block, stripped before scoring" in output


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_ctrl_c_stops_cleanly(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "evaluator",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", time.monotonic() + 60)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=20)
    except BaseException:
        proc.kill()
        raise
    assert proc.returncode == 0, output
