"""The client helper against real servers: retries, default deadlines, readiness, settings."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common.client import (
    ClientSettings,
    ServerNotReadyError,
    create_channel,
    wait_for_ready,
)
from services.common.config import CommonSettings


async def test_unavailable_is_retried_until_it_succeeds(
    evaluator_server: Any, fake_evaluator: Any, make_request: Any
) -> None:
    async with create_channel(evaluator_server.address) as channel:
        response = await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(
            make_request("flaky:2")
        )
    assert response.result.objective == 0.5
    assert fake_evaluator.calls == 3


async def test_retries_stop_at_max_attempts(
    evaluator_server: Any, fake_evaluator: Any, make_request: Any
) -> None:
    async with create_channel(evaluator_server.address, ClientSettings(max_attempts=2)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(make_request("flaky:5"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fake_evaluator.calls == 2


async def test_other_codes_are_not_retried(
    evaluator_server: Any, fake_evaluator: Any, make_request: Any
) -> None:
    async with create_channel(evaluator_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(
                make_request("raise:FailedPrecondition")
            )
    assert fake_evaluator.calls == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_server_that_starts_after_the_first_attempt_is_reached_by_a_retry(
    start: Any, fake_evaluator: Any, make_definition: Any, make_request: Any
) -> None:
    port = free_port()
    async with create_channel(f"127.0.0.1:{port}") as channel:
        call = asyncio.ensure_future(
            evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(make_request("ok"))
        )
        await asyncio.sleep(0.1)  # the first attempt has failed by now
        assert not call.done()
        await start([make_definition(fake_evaluator)], port=port, metrics_port=None)
        response = await asyncio.wait_for(call, 10)
    assert response.result.objective == 0.5


async def test_a_call_without_a_timeout_gets_the_default_deadline(
    evaluator_server: Any, make_request: Any
) -> None:
    settings = ClientSettings(default_timeout=0.2)
    async with create_channel(evaluator_server.address, settings) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Evaluate(make_request("sleep:3"))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # An explicit timeout wins over the default.
        response = await stub.Evaluate(make_request("sleep:0.4"), timeout=3)
    assert response.result.objective == 0.5


async def test_wait_for_ready_returns_once_serving(evaluator_server: Any) -> None:
    async with create_channel(evaluator_server.address) as channel:
        await wait_for_ready(channel, "loratune.evaluator.v1.EvaluatorService", timeout=5)
        await wait_for_ready(channel, timeout=5)


async def test_wait_for_ready_waits_for_a_server_still_starting(
    start: Any, fake_evaluator: Any, make_definition: Any
) -> None:
    port = free_port()
    async with create_channel(f"127.0.0.1:{port}") as channel:
        waiting = asyncio.ensure_future(wait_for_ready(channel, timeout=10))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await start([make_definition(fake_evaluator)], port=port, metrics_port=None)
        await asyncio.wait_for(waiting, 10)


async def test_wait_for_ready_times_out_with_a_clear_error(start: Any) -> None:
    server = await start([], CommonSettings(), metrics_port=None)
    await server.set_serving("", False)
    async with create_channel(server.address) as channel:
        with pytest.raises(
            ServerNotReadyError, match=r"the server not SERVING after 0\.3s \(last: NOT_SERVING\)"
        ):
            await wait_for_ready(channel, timeout=0.3)
        with pytest.raises(ServerNotReadyError, match="does not know this service"):
            await wait_for_ready(channel, "loratune.nothing.v1.Nothing", timeout=0.3)


async def test_wait_for_ready_times_out_when_nothing_listens() -> None:
    async with create_channel(f"127.0.0.1:{free_port()}") as channel:
        with pytest.raises(ServerNotReadyError, match=r"not SERVING after 0\.3s"):
            await wait_for_ready(channel, timeout=0.3)


def test_settings_from_env_and_what_they_hide() -> None:
    settings = ClientSettings.from_env(
        {
            "LORATUNE_AUTH_TOKEN": "client-secret-1",
            "LORATUNE_TLS_CA": "/etc/loratune/ca.pem",
            "LORATUNE_TLS_CLIENT_CERT": "/etc/loratune/client.pem",
            "LORATUNE_TLS_CLIENT_KEY": "/etc/loratune/client.key",
            "LORATUNE_TLS_SERVER_NAME": "optimizer.loratune.svc",
            "UNRELATED": "x",
        }
    )
    assert settings.token == "client-secret-1"
    assert settings.ca_cert == Path("/etc/loratune/ca.pem")
    assert settings.client_cert == Path("/etc/loratune/client.pem")
    assert settings.client_key == Path("/etc/loratune/client.key")
    assert settings.server_name == "optimizer.loratune.svc"
    assert settings.tls
    assert "client-secret-1" not in repr(settings)

    empty = ClientSettings.from_env({"LORATUNE_AUTH_TOKEN": "", "LORATUNE_TLS_CA": " "})
    assert empty == ClientSettings()
    assert not empty.tls


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="LORATUNE_TLS_CLIENT_KEY"):
        ClientSettings.from_env({"LORATUNE_TLS_CLIENT_CERT": "/tmp/client.pem"})
    with pytest.raises(ValueError, match="max_attempts"):
        ClientSettings(max_attempts=6)
