"""Bearer-token auth on a real server: who gets in, what is counted, what is never logged."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings
from services.common.interceptors import UNAUTHENTICATED_MESSAGE
from services.common.logging import configure_logging

TOKEN = "tok-3f9a1c0b-do-not-log"


@pytest.fixture
async def auth_server(
    start: Any, fake_evaluator: Any, make_definition: Any, caplog: pytest.LogCaptureFixture
) -> Any:
    caplog.set_level(logging.DEBUG)
    settings = CommonSettings(auth_token=SecretStr(TOKEN), grace_period_seconds=1)
    return await start([make_definition(fake_evaluator)], settings)


async def evaluate(address: str, request: Any, **settings: Any) -> Any:
    async with create_channel(address, ClientSettings(max_attempts=1, **settings)) as channel:
        return await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(request)


async def test_the_right_token_gets_in(auth_server: Any, make_request: Any) -> None:
    response = await evaluate(auth_server.address, make_request("ok"), token=TOKEN)
    assert response.result.objective == 0.5


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", TOKEN[:-1]])
async def test_a_missing_or_wrong_token_is_unauthenticated_before_the_servicer_runs(
    auth_server: Any, fake_evaluator: Any, make_request: Any, token: str | None
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(auth_server.address, make_request("ok"), token=token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == UNAUTHENTICATED_MESSAGE
    assert fake_evaluator.calls == 0


async def test_the_scheme_is_case_insensitive_and_other_schemes_fail(
    auth_server: Any, make_request: Any
) -> None:
    async with create_channel(auth_server.address, ClientSettings(max_attempts=1)) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        response = await stub.Evaluate(
            make_request("ok"), metadata=(("authorization", f"bearer {TOKEN}"),)
        )
        assert response.result.objective == 0.5
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Evaluate(make_request("ok"), metadata=(("authorization", f"Basic {TOKEN}"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_token_but_reflection_does(auth_server: Any) -> None:
    async with create_channel(auth_server.address, ClientSettings(max_attempts=1)) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in reflection(iter([b""])):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rejected_calls_are_counted_as_unauthenticated(
    auth_server: Any, make_request: Any, metrics: Any
) -> None:
    before = metrics.handled("UNAUTHENTICATED")
    with pytest.raises(grpc.aio.AioRpcError):
        await evaluate(auth_server.address, make_request("ok"), token="wrong-token")
    assert await metrics.wait_for_handled("UNAUTHENTICATED", before + 1) == before + 1


async def test_the_token_never_reaches_the_log_or_the_client(
    auth_server: Any, make_request: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await evaluate(auth_server.address, make_request("ok"), token=TOKEN)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(auth_server.address, make_request("ok"), token=TOKEN[:-1])
    assert TOKEN[:-1] not in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError):
        await evaluate(auth_server.address, make_request("boom:x"), token=TOKEN)
    await auth_server.stop(0)

    logged = "\n".join(
        caplog.handler.format(record)
        for record in [*caplog.get_records("setup"), *caplog.get_records("call")]
    )
    assert "auth=True" in logged  # the start-up line is there, without the token
    assert "rejected /loratune.evaluator.v1.EvaluatorService/Evaluate" in logged
    assert "unexpected error in" in logged
    assert TOKEN[:-1] not in logged


async def test_a_servicer_that_leaks_the_token_into_an_error_is_redacted_in_the_log(
    auth_server: Any,
    make_request: Any,
    root_logging: logging.Logger,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "INFO")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(auth_server.address, make_request(f"boom:{TOKEN}"), token=TOKEN)
    assert TOKEN not in (caught.value.details() or "")
    logged = capsys.readouterr().err
    assert "unexpected failure holding ***" in logged
    assert TOKEN not in logged


async def test_wrong_tokens_slow_their_address_down_and_the_right_one_waits_too(
    start: Any,
    fake_evaluator: Any,
    make_definition: Any,
    make_request: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import functools

    from prometheus_client import REGISTRY

    from services.common import interceptors, throttle

    monkeypatch.setattr(
        interceptors,
        "AuthThrottle",
        functools.partial(throttle.AuthThrottle, free_failures=2, base_delay=0.6),
    )
    server = await start(
        [make_definition(fake_evaluator)], CommonSettings(auth_token=SecretStr(TOKEN))
    )

    def counted(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"path": "grpc"}) or 0.0

    failures = counted("loratune_auth_failures_total")
    refused = counted("loratune_auth_throttled_total")
    for _ in range(3):  # two free wrong tries, and a third that earns a delay
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await evaluate(server.address, make_request("ok"), token="guess")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # While slowed down, nothing from this address is looked at, the right token neither.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(server.address, make_request("ok"), token=TOKEN)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after 1 s" in (caught.value.details() or "")
    assert ("retry-after", "1") in tuple(caught.value.trailing_metadata() or ())
    assert fake_evaluator.calls == 0
    assert counted("loratune_auth_failures_total") - failures == 3
    assert counted("loratune_auth_throttled_total") - refused == 1
    await asyncio.sleep(0.7)
    response = await evaluate(server.address, make_request("ok"), token=TOKEN)
    assert response.result.objective == 0.5
