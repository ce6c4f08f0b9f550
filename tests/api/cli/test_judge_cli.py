"""`loratune judge-models` and `loratune judge`, in-process and against a running gateway."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from services.cli.main import app
from tests.fakes.gemini import FakeGemini
from tests.fakes.http import Reply

runner = CliRunner()
KEY = "AIzaSy-cli-secret-key"


@pytest.fixture
def gemini(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGemini]:
    with FakeGemini(api_key=KEY) as fake:
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fake.url)
        monkeypatch.delenv("GIGACHAT_CREDENTIALS", raising=False)
        monkeypatch.delenv("LORATUNE_JUDGE_ADDRESS", raising=False)
        yield fake


def test_judge_models_lists_the_registry(gemini: FakeGemini) -> None:
    result = runner.invoke(app, ["judge-models"])
    assert result.exit_code == 0, result.output
    assert "gemini" in result.output and "gigachat" in result.output
    assert "GIGACHAT_CREDENTIALS" in result.output
    assert KEY not in result.output


def test_judge_one_item_prints_score_and_reasoning(gemini: FakeGemini) -> None:
    gemini.script(Reply.json_text(json.dumps({"reasoning": "Same amount.", "score": 88})))
    result = runner.invoke(
        app,
        [
            "judge",
            "--model",
            "gemini",
            "--prompt",
            "Limit?",
            "--candidate",
            "500 EUR",
            "--reference",
            "500 euro a day",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "score: 88/100" in result.output and "Same amount." in result.output


def test_unknown_model_is_a_refused_request(gemini: FakeGemini) -> None:
    result = runner.invoke(
        app, ["judge", "--model", "nope", "--prompt", "p", "--candidate", "c", "--reference", "r"]
    )
    assert result.exit_code == 2, result.output
    assert "error (NOT_FOUND): LLM Judge model not found: 'nope'" in result.output


def test_serve_judge_gateway_process(gemini: FakeGemini) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "serve",
            "judge-gateway",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(
                            service="loratune.judge.v1.JudgeGatewayService"
                        ),
                        timeout=1,
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "gateway never became SERVING"
                time.sleep(0.2)
        result = runner.invoke(
            app,
            [
                "judge",
                "--gateway",
                address,
                "--prompt",
                "p",
                "--candidate",
                "c",
                "--reference",
                "r",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "score: 80/100" in result.output
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    except BaseException:
        proc.kill()
        raise
    assert proc.returncode == 0, output
    assert KEY not in output
