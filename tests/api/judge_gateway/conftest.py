"""Fixtures: fake Gemini / GigaChat HTTP servers and a real judge gateway using the real SDKs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from loratune.judge.v1 import judge_pb2_grpc
from services.common.config import CommonSettings
from services.common.server import RunningServer, start_server
from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.main import build_gateway, service_definition
from tests.fakes.gemini import FakeGemini
from tests.fakes.gigachat import FakeGigaChat

GEMINI_KEY = "AIzaSy-test-secret-gemini-key-0001"
GIGACHAT_CREDENTIALS = "dGVzdC1jbGllbnQtaWQ6dGVzdC1zZWNyZXQtY3JlZGVudGlhbHM="


@dataclass
class Judge:
    """A running gateway, its stub, and the fakes behind it."""

    server: RunningServer
    channel: grpc.aio.Channel
    stub: judge_pb2_grpc.JudgeGatewayServiceStub
    gemini: FakeGemini
    gigachat: FakeGigaChat
    env: dict[str, str]


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=GEMINI_KEY) as fake:
        yield fake


@pytest.fixture
def gigachat() -> Iterator[FakeGigaChat]:
    with FakeGigaChat(credentials=GIGACHAT_CREDENTIALS) as fake:
        yield fake


def provider_env(gemini: FakeGemini, gigachat: FakeGigaChat) -> dict[str, str]:
    return {
        "GEMINI_API_KEY": GEMINI_KEY,
        "GOOGLE_GEMINI_BASE_URL": gemini.url,
        "GIGACHAT_CREDENTIALS": GIGACHAT_CREDENTIALS,
        "GIGACHAT_BASE_URL": gigachat.url,
        "GIGACHAT_AUTH_URL": gigachat.auth_url,
        "GIGACHAT_MODEL": "GigaChat-2-Max",
    }


@pytest.fixture
async def start_judge(
    gemini: FakeGemini, gigachat: FakeGigaChat
) -> AsyncIterator[Callable[..., Any]]:
    """Starts a gateway with settings overrides; stopped at the end of the test."""
    started: list[Judge] = []

    async def start(env_extra: dict[str, str] | None = None, **overrides: Any) -> Judge:
        settings = JudgeSettings(
            **{
                "retry_base_delay_seconds": 0.05,
                "retry_budget_seconds": 10.0,
                "attempt_timeout_seconds": 5.0,
                "breaker_threshold": 3,
                "breaker_cooldown_seconds": 1.0,
                **overrides,
            }
        )
        env = {**provider_env(gemini, gigachat), **(env_extra or {})}
        gateway = build_gateway(settings, env)
        server = await start_server(
            [service_definition(gateway)], CommonSettings(), host="127.0.0.1", metrics_port=0
        )
        channel = grpc.aio.insecure_channel(server.address)
        judge = Judge(
            server, channel, judge_pb2_grpc.JudgeGatewayServiceStub(channel), gemini, gigachat, env
        )
        started.append(judge)
        return judge

    yield start
    for judge in started:
        await judge.channel.close()
        await judge.server.stop(0)


@pytest.fixture
async def judge(start_judge: Callable[..., Any]) -> Judge:
    return await start_judge()


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "judge-cache.sqlite"
