"""The bootstrap on real sockets: health, reflection, message limits, graceful stop, on_stop."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings

# No retries where a refusal is the expected answer: it comes at once.
NO_RETRIES = ClientSettings(max_attempts=1)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel: grpc.aio.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return response.status


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    call = stub.ServerReflectionInfo(requests(), timeout=2)
    async for response in call:
        return [service.name for service in response.list_services_response.service]
    raise AssertionError("no reflection response")


async def test_health_is_serving_for_the_server_and_each_service(evaluator_server: Any) -> None:
    async with create_channel(evaluator_server.address) as channel:
        assert await check(channel, "") == SERVING
        assert await check(channel, "loratune.evaluator.v1.EvaluatorService") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel, "loratune.nothing.v1.Nothing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_port_zero_binds_a_real_port(evaluator_server: Any) -> None:
    assert evaluator_server.port > 0
    assert evaluator_server.address == f"127.0.0.1:{evaluator_server.port}"
    assert evaluator_server.metrics_port and evaluator_server.metrics_port > 0


async def test_reflection_lists_the_services(evaluator_server: Any) -> None:
    async with create_channel(evaluator_server.address) as channel:
        names = await list_services(channel)
    assert "loratune.evaluator.v1.EvaluatorService" in names
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_reflection_off_when_disabled(
    start: Any, fake_evaluator: Any, make_definition: Any
) -> None:
    server = await start([make_definition(fake_evaluator)], CommonSettings(reflection=False))
    async with create_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(channel)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_messages_over_the_limit_are_refused(
    start: Any, fake_evaluator: Any, make_definition: Any, make_request: Any
) -> None:
    server = await start([make_definition(fake_evaluator)], CommonSettings(max_message_bytes=1024))
    async with create_channel(server.address) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        request = make_request("ok")
        request.references[:] = ["x" * 4096]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Evaluate(request)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake_evaluator.calls == 0


async def test_health_watchers_see_not_serving_as_stop_begins_and_in_flight_calls_finish(
    start: Any, fake_evaluator: Any, make_definition: Any, make_request: Any
) -> None:
    server = await start([make_definition(fake_evaluator)])
    async with create_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="loratune.evaluator.v1.EvaluatorService")
        )
        assert (await watch.read()).status == SERVING
        slow = asyncio.ensure_future(
            evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(make_request("sleep:0.5"))
        )
        await asyncio.sleep(0.1)  # the slow call is in the server
        stopping = asyncio.ensure_future(server.stop(grace=3))
        assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
        response = await slow
        assert response.result.objective == 0.5
        await asyncio.wait_for(stopping, 4)


async def test_check_during_the_drain_answers_not_serving_then_new_calls_are_refused(
    start: Any, fake_evaluator: Any, make_definition: Any, make_request: Any
) -> None:
    server = await start([make_definition(fake_evaluator)])
    async with create_channel(server.address) as channel:
        assert await check(channel, "") == SERVING
        slow = asyncio.ensure_future(
            evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(make_request("sleep:0.6"))
        )
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop(grace=3, drain=0.4))
        await asyncio.sleep(0.1)
        assert not stopping.done()
        assert await check(channel, "") == NOT_SERVING
        assert await check(channel, "loratune.evaluator.v1.EvaluatorService") == NOT_SERVING
        assert (await slow).result.objective == 0.5
        await asyncio.wait_for(stopping, 4)

    async with create_channel(server.address, NO_RETRIES) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(channel, "")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_cancels_what_outlives_the_grace_then_runs_on_stop_once(
    start: Any, fake_evaluator: Any, make_definition: Any, make_request: Any
) -> None:
    released: list[str] = []

    async def on_stop() -> None:
        released.append("evaluator")

    server = await start([make_definition(fake_evaluator, on_stop)])
    async with create_channel(server.address, NO_RETRIES) as channel:
        stuck = asyncio.ensure_future(
            evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(make_request("sleep:30"))
        )
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.gather(server.stop(grace=0.3), server.stop(grace=0.3))
        assert loop.time() - began < 2
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stuck
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    await server.stop()
    await server.wait_for_termination()
    assert released == ["evaluator"]


async def test_a_failing_on_stop_does_not_keep_the_others_from_running(
    start: Any, make_definition: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from services.common.server import ServiceDefinition

    released: list[str] = []

    async def failing() -> None:
        raise RuntimeError("cannot release")

    async def fine() -> None:
        released.append("second")

    server = await start(
        [
            ServiceDefinition("test.v1.First", lambda _server: None, failing),
            ServiceDefinition("test.v1.Second", lambda _server: None, fine),
        ]
    )
    await server.stop(0)
    assert released == ["second"]
    assert "on_stop of test.v1.First failed" in caplog.text


async def test_starting_on_a_taken_port_fails_clearly(evaluator_server: Any, start: Any) -> None:
    with pytest.raises(RuntimeError, match=r"cannot listen on 127\.0\.0\.1"):
        await start([], port=evaluator_server.port, metrics_port=None)


async def test_metrics_port_none_serves_no_metrics(start: Any) -> None:
    server = await start([], metrics_port=None)
    assert server.metrics_port is None
    async with create_channel(server.address) as channel:
        assert await check(channel, "") == SERVING
