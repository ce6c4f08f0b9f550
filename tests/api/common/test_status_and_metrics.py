"""The status interceptor through a real server: error mapping and the grpc_server_* metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common import errors
from services.common.client import ClientSettings, create_channel
from services.common.interceptors import GENERIC_INTERNAL_MESSAGE
from services.common.server import ServiceDefinition

EVALUATOR = "loratune.evaluator.v1.EvaluatorService"
DOMAIN_ERRORS = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
]
# UNAVAILABLE would be retried by the client; these tests look at one attempt.
ONE_ATTEMPT = ClientSettings(max_attempts=1)


async def evaluate(address: str, request: Any, settings: ClientSettings = ONE_ATTEMPT) -> Any:
    async with create_channel(address, settings) as channel:
        return await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(request)


async def failure(address: str, request: Any, settings: ClientSettings = ONE_ATTEMPT) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(address, request, settings)
    return caught.value


@pytest.mark.parametrize(
    ("error_class", "code"), DOMAIN_ERRORS, ids=lambda v: v.__name__ if isinstance(v, type) else ""
)
async def test_each_domain_error_becomes_its_status_with_the_field_in_the_details(
    evaluator_server: Any,
    make_request: Any,
    error_class: type[errors.LoratuneError],
    code: grpc.StatusCode,
) -> None:
    assert error_class.code == code.name
    error = await failure(evaluator_server.address, make_request(f"raise:{error_class.__name__}"))
    assert error.code() == code
    assert error.details() == "predictions: the thing is wrong"


async def test_an_unexpected_exception_is_internal_with_a_generic_message_and_a_logged_traceback(
    evaluator_server: Any, make_request: Any, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-fake-7c1d0e"
    with caplog.at_level(logging.ERROR, logger="services.common.interceptors"):
        error = await failure(evaluator_server.address, make_request(f"boom:{secret}"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == GENERIC_INTERNAL_MESSAGE
    assert secret not in (error.details() or "")
    assert secret not in str(error.trailing_metadata())
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert f"/{EVALUATOR}/Evaluate" in record.getMessage()


async def test_a_handlers_own_abort_keeps_its_code_and_is_counted(
    evaluator_server: Any, make_request: Any, metrics: Any
) -> None:
    before = metrics.handled("PERMISSION_DENIED")
    error = await failure(evaluator_server.address, make_request("abort:PERMISSION_DENIED"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "aborted by the handler"
    assert await metrics.wait_for_handled("PERMISSION_DENIED", before + 1) == before + 1


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def handled_labels(code: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {"grpc_service": EVALUATOR, "grpc_method": "Evaluate", "grpc_code": code}.items()
    )


async def test_metrics_endpoint_counts_ok_and_invalid_argument_and_times_each_call(
    evaluator_server: Any, make_request: Any, metrics: Any
) -> None:
    ok_key = ("grpc_server_handled_total", handled_labels("OK"))
    invalid_key = ("grpc_server_handled_total", handled_labels("INVALID_ARGUMENT"))
    timing_key = (
        "grpc_server_handling_seconds_count",
        frozenset({"grpc_service": EVALUATOR, "grpc_method": "Evaluate"}.items()),
    )
    started_key = (
        "grpc_server_started_total",
        frozenset({"grpc_service": EVALUATOR, "grpc_method": "Evaluate"}.items()),
    )
    before = await asyncio.to_thread(scrape, evaluator_server.metrics_port)

    await evaluate(evaluator_server.address, make_request("ok"))
    await evaluate(evaluator_server.address, make_request("ok"))
    await failure(evaluator_server.address, make_request("raise:InvalidArgument"))
    await metrics.wait_for_handled("INVALID_ARGUMENT", before.get(invalid_key, 0) + 1)

    after = await asyncio.to_thread(scrape, evaluator_server.metrics_port)
    assert after[ok_key] == before.get(ok_key, 0) + 2
    assert after[invalid_key] == before.get(invalid_key, 0) + 1
    assert after[timing_key] == before.get(timing_key, 0) + 3
    assert after[started_key] == before.get(started_key, 0) + 3
    assert any(name == "grpc_server_handling_seconds_bucket" for name, _ in after)


async def test_health_and_reflection_calls_are_counted_too(
    evaluator_server: Any, metrics: Any
) -> None:
    before = metrics.handled("OK", method="Check", service="grpc.health.v1.Health")
    async with create_channel(evaluator_server.address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert (
        await metrics.wait_for_handled(
            "OK", before + 1, method="Check", service="grpc.health.v1.Health"
        )
        == before + 1
    )


async def test_a_cancelled_call_counts_as_cancelled_and_a_timed_out_one_as_deadline_exceeded(
    evaluator_server: Any, make_request: Any, metrics: Any
) -> None:
    cancelled_before = metrics.handled("CANCELLED")
    deadline_before = metrics.handled("DEADLINE_EXCEEDED")
    async with create_channel(evaluator_server.address, ONE_ATTEMPT) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        call = stub.Evaluate(make_request("sleep:5"))
        await asyncio.sleep(0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Evaluate(make_request("sleep:5"), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await metrics.wait_for_handled("CANCELLED", cancelled_before + 1) == cancelled_before + 1
    assert (
        await metrics.wait_for_handled("DEADLINE_EXCEEDED", deadline_before + 1)
        == deadline_before + 1
    )


# Streaming kinds, through generic handlers of a made-up service (bytes in, bytes out).
STREAMS = "loratune.test.v1.StreamService"


async def _numbers(request: bytes, context: Any) -> AsyncIterator[bytes]:
    count = int(request.decode())
    for number in range(count):
        yield str(number).encode()
    if count == 2:
        raise errors.NotFound("no third number", field="count")
    if count == 3:
        raise RuntimeError("broken stream")


async def _written_numbers(request: bytes, context: Any) -> None:
    for number in range(int(request.decode())):
        await context.write(str(number).encode())
    if request == b"0":
        raise errors.FailedPrecondition("nothing to write", field="count")


async def _total(requests: AsyncIterator[bytes], context: Any) -> bytes:
    total = 0
    async for request in requests:
        total += int(request.decode())
    if total < 0:
        raise errors.InvalidArgument("negative total", field="requests")
    return str(total).encode()


async def _echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        if request == b"stop":
            raise errors.Cancelled("asked to stop", field="requests")
        yield request


def _register_streams(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                STREAMS,
                {
                    "Numbers": grpc.unary_stream_rpc_method_handler(_numbers),
                    "WrittenNumbers": grpc.unary_stream_rpc_method_handler(_written_numbers),
                    "Total": grpc.stream_unary_rpc_method_handler(_total),
                    "Echo": grpc.stream_stream_rpc_method_handler(_echo),
                },
            )
        ]
    )


@pytest.fixture
async def stream_server(start: Any) -> Any:
    return await start([ServiceDefinition(STREAMS, _register_streams)])


async def _requests(*items: bytes) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_server_streams_are_mapped_and_counted(stream_server: Any, metrics: Any) -> None:
    def handled(code: str, method: str) -> float:
        return float(metrics.handled(code, method=method, service=STREAMS))

    before = {
        (code, method): handled(code, method)
        for code in ("OK", "NOT_FOUND", "INTERNAL", "FAILED_PRECONDITION")
        for method in ("Numbers", "WrittenNumbers")
    }
    async with create_channel(stream_server.address, ONE_ATTEMPT) as channel:
        numbers = channel.unary_stream(f"/{STREAMS}/Numbers", None, None)
        written = channel.unary_stream(f"/{STREAMS}/WrittenNumbers", None, None)
        assert [m async for m in numbers(b"4")] == [b"0", b"1", b"2", b"3"]
        assert [m async for m in written(b"3")] == [b"0", b"1", b"2"]

        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in numbers(b"2"):
                received.append(message)
        assert received == [b"0", b"1"]
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "count: no third number"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in numbers(b"3"):
                pass
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == GENERIC_INTERNAL_MESSAGE

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in written(b"0"):
                pass
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    expected = {
        ("OK", "Numbers"): 1,
        ("NOT_FOUND", "Numbers"): 1,
        ("INTERNAL", "Numbers"): 1,
        ("OK", "WrittenNumbers"): 1,
        ("FAILED_PRECONDITION", "WrittenNumbers"): 1,
    }
    for (code, method), increase in expected.items():
        value = await metrics.wait_for_handled(
            code, before[code, method] + increase, method=method, service=STREAMS
        )
        assert value == before[code, method] + increase, (code, method)


async def test_client_streams_are_mapped_and_counted(stream_server: Any, metrics: Any) -> None:
    before_ok = metrics.handled("OK", method="Total", service=STREAMS)
    before_echo_cancelled = metrics.handled("CANCELLED", method="Echo", service=STREAMS)
    async with create_channel(stream_server.address, ONE_ATTEMPT) as channel:
        total = channel.stream_unary(f"/{STREAMS}/Total", None, None)
        echo = channel.stream_stream(f"/{STREAMS}/Echo", None, None)
        assert await total(_requests(b"1", b"2", b"3")) == b"6"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await total(_requests(b"1", b"-5"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "requests: negative total"

        assert [m async for m in echo(_requests(b"a", b"b"))] == [b"a", b"b"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in echo(_requests(b"a", b"stop", b"c")):
                pass
        assert caught.value.code() == grpc.StatusCode.CANCELLED

    assert (
        await metrics.wait_for_handled("OK", before_ok + 1, method="Total", service=STREAMS)
        == before_ok + 1
    )
    assert (
        await metrics.wait_for_handled(
            "CANCELLED", before_echo_cancelled + 1, method="Echo", service=STREAMS
        )
        == before_echo_cancelled + 1
    )


async def test_a_stream_the_client_abandons_counts_as_cancelled(start: Any, metrics: Any) -> None:
    closed = asyncio.Event()

    async def endless(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "loratune.test.v1.Endless",
                    {"Ticks": grpc.unary_stream_rpc_method_handler(endless)},
                )
            ]
        )

    server = await start([ServiceDefinition("loratune.test.v1.Endless", register)])
    before = metrics.handled("CANCELLED", method="Ticks", service="loratune.test.v1.Endless")
    async with create_channel(server.address, ONE_ATTEMPT) as channel:
        call = channel.unary_stream("/loratune.test.v1.Endless/Ticks", None, None)(b"")
        assert await call.read() == b"tick"
        call.cancel()
        # The servicer's own finally runs promptly, not at garbage collection.
        await asyncio.wait_for(closed.wait(), 2)
    value = await metrics.wait_for_handled(
        "CANCELLED", before + 1, method="Ticks", service="loratune.test.v1.Endless"
    )
    assert value == before + 1


async def test_unknown_methods_are_unimplemented_and_not_counted(
    evaluator_server: Any, metrics: Any
) -> None:
    async with create_channel(evaluator_server.address, ONE_ATTEMPT) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/made.up.Service/Nothing", None, None)(b"")
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (
        metrics.value(
            "grpc_server_started_total", grpc_service="made.up.Service", grpc_method="Nothing"
        )
        == 0
    )
