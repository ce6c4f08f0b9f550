"""TLS and mutual TLS between the server bootstrap and the client helper, on real sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import grpc.aio
import pytest
from pydantic import SecretStr

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings

TOKEN = "tls-token-5d2e"


async def evaluate(address: str, request: Any, settings: ClientSettings) -> Any:
    async with create_channel(address, settings) as channel:
        return await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(request, timeout=5)


async def refused(address: str, request: Any, settings: ClientSettings) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluate(address, request, dataclasses.replace(settings, max_attempts=1))
    return caught.value.code()


@pytest.fixture
async def tls_server(
    start: Any, fake_evaluator: Any, make_definition: Any, certificates: Any
) -> Any:
    settings = CommonSettings(
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        auth_token=SecretStr(TOKEN),
    )
    return await start([make_definition(fake_evaluator)], settings)


@pytest.fixture
async def mtls_server(
    start: Any, fake_evaluator: Any, make_definition: Any, certificates: Any
) -> Any:
    settings = CommonSettings(
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        tls_client_ca=certificates.ca,
    )
    return await start([make_definition(fake_evaluator)], settings)


async def test_tls_with_the_ca_and_a_token_works(
    tls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(ca_cert=certificates.ca, token=TOKEN)
    response = await evaluate(tls_server.address, make_request("ok"), settings)
    assert response.result.objective == 0.5


async def test_over_tls_the_token_still_counts(
    tls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(ca_cert=certificates.ca)
    code = await refused(tls_server.address, make_request("ok"), settings)
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_the_server_name_can_be_overridden(
    tls_server: Any, make_request: Any, certificates: Any
) -> None:
    # Reached by IP, verified as "localhost" (the other name in the certificate).
    settings = ClientSettings(ca_cert=certificates.ca, token=TOKEN, server_name="localhost")
    response = await evaluate(tls_server.address, make_request("ok"), settings)
    assert response.result.objective == 0.5
    wrong = ClientSettings(ca_cert=certificates.ca, token=TOKEN, server_name="elsewhere.example")
    assert (
        await refused(tls_server.address, make_request("ok"), wrong) == grpc.StatusCode.UNAVAILABLE
    )


async def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(ca_cert=certificates.other_ca, token=TOKEN)
    assert (
        await refused(tls_server.address, make_request("ok"), settings)
        == grpc.StatusCode.UNAVAILABLE
    )


async def test_a_plaintext_client_is_refused_by_a_tls_server(
    tls_server: Any, make_request: Any
) -> None:
    settings = ClientSettings(token=TOKEN)
    assert (
        await refused(tls_server.address, make_request("ok"), settings)
        == grpc.StatusCode.UNAVAILABLE
    )


async def test_mtls_with_a_client_certificate_works(
    mtls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(
        ca_cert=certificates.ca,
        client_cert=certificates.client_cert,
        client_key=certificates.client_key,
    )
    response = await evaluate(mtls_server.address, make_request("ok"), settings)
    assert response.result.objective == 0.5


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(ca_cert=certificates.ca)
    assert (
        await refused(mtls_server.address, make_request("ok"), settings)
        == grpc.StatusCode.UNAVAILABLE
    )


async def test_mtls_refuses_a_certificate_from_another_ca(
    mtls_server: Any, make_request: Any, certificates: Any
) -> None:
    settings = ClientSettings(
        ca_cert=certificates.ca,
        client_cert=certificates.other_client_cert,
        client_key=certificates.other_client_key,
    )
    assert (
        await refused(mtls_server.address, make_request("ok"), settings)
        == grpc.StatusCode.UNAVAILABLE
    )


async def test_an_unreadable_certificate_names_the_variable(start: Any, tmp_path: Any) -> None:
    settings = CommonSettings(tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "missing.key")
    with pytest.raises(RuntimeError, match="LORATUNE_TLS_CERT"):
        await start([], settings)
