"""Fixtures for the shared runtime's tests: a fake evaluator, real servers, certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import REGISTRY

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common import errors
from services.common.config import CommonSettings
from services.common.server import RunningServer, ServiceDefinition, start_server

EVALUATOR = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name


class FakeEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Does what ``predictions[0]`` says: ``ok``, ``raise:<ErrorClass>``, ``boom:<text>``,
    ``sleep:<seconds>``, ``abort:<CODE>``, ``flaky:<n>`` (UNAVAILABLE n times, then OK).
    """

    def __init__(self) -> None:
        self.calls = 0
        self.flaky_failures = 0
        self.stopped = False

    async def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> evaluator_pb2.EvaluateResponse:
        self.calls += 1
        command, _, argument = (request.predictions[0] if request.predictions else "ok").partition(
            ":"
        )
        if command == "raise":
            error_class: type[errors.LoratuneError] = getattr(errors, argument)
            raise error_class("the thing is wrong", field="predictions")
        if command == "boom":
            raise RuntimeError(f"unexpected failure holding {argument}")
        if command == "sleep":
            await asyncio.sleep(float(argument))
        if command == "abort":
            await context.abort(grpc.StatusCode[argument], "aborted by the handler")
        if command == "flaky" and self.flaky_failures < int(argument):
            self.flaky_failures += 1
            raise errors.Unavailable("try again")
        return evaluator_pb2.EvaluateResponse(
            result=common_pb2.EvaluationResult(objective=0.5, objective_name="f1_macro")
        )


def evaluate_request(command: str = "ok") -> evaluator_pb2.EvaluateRequest:
    """An Evaluate request carrying a FakeEvaluator command."""
    return evaluator_pb2.EvaluateRequest(
        task_type=common_pb2.TASK_TYPE_CLASSIFICATION, predictions=[command], references=["a"]
    )


def evaluator_definition(
    servicer: FakeEvaluator, on_stop: Callable[[], Awaitable[None]] | None = None
) -> ServiceDefinition:
    """The ServiceDefinition a main.py would build for ``servicer``."""
    return ServiceDefinition(
        full_name=EVALUATOR,
        register=lambda server: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(
            servicer, server
        ),
        on_stop=on_stop,
    )


class Metrics:
    """Reads samples of the default registry (process-global: compare before and after)."""

    @staticmethod
    def value(name: str, **labels: str) -> float:
        """A sample's current value (0 when absent)."""
        return REGISTRY.get_sample_value(name, labels) or 0.0

    @classmethod
    def handled(cls, code: str, method: str = "Evaluate", service: str = EVALUATOR) -> float:
        """``grpc_server_handled_total`` for one method and code."""
        return cls.value(
            "grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code
        )

    @classmethod
    async def wait_for(cls, name: str, minimum: float, within: float = 5, **labels: str) -> float:
        """Wait until a sample reaches ``minimum``: the server records after the client returns."""
        for _ in range(int(within / 0.02)):
            if cls.value(name, **labels) >= minimum:
                break
            await asyncio.sleep(0.02)
        return cls.value(name, **labels)

    @classmethod
    async def wait_for_handled(
        cls, code: str, minimum: float, method: str = "Evaluate", service: str = EVALUATOR
    ) -> float:
        """Wait until ``handled(code)`` reaches ``minimum``."""
        return await cls.wait_for(
            "grpc_server_handled_total",
            minimum,
            grpc_service=service,
            grpc_method=method,
            grpc_code=code,
        )


@pytest.fixture
def metrics() -> type[Metrics]:
    return Metrics


@pytest.fixture
def make_request() -> Callable[[str], evaluator_pb2.EvaluateRequest]:
    return evaluate_request


@pytest.fixture
def make_definition() -> Callable[..., ServiceDefinition]:
    return evaluator_definition


StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, restored afterwards: for tests that call configure_logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def fake_evaluator() -> FakeEvaluator:
    return FakeEvaluator()


@pytest.fixture
async def start() -> AsyncIterator[StartServer]:
    """Starts real servers on 127.0.0.1:0 and stops every one at the end of the test."""
    running: list[RunningServer] = []

    async def _start(
        services: Sequence[ServiceDefinition],
        settings: CommonSettings | None = None,
        **kwargs: Any,
    ) -> RunningServer:
        kwargs.setdefault("host", "127.0.0.1")
        server = await start_server(
            services, settings or CommonSettings(grace_period_seconds=1), **kwargs
        )
        running.append(server)
        return server

    yield _start
    await asyncio.gather(*(server.stop(0) for server in running))


@pytest.fixture
async def evaluator_server(start: StartServer, fake_evaluator: FakeEvaluator) -> RunningServer:
    return await start([evaluator_definition(fake_evaluator)])


@dataclass(frozen=True)
class Certificates:
    """PEM files for TLS tests: a CA, a server and a client it signed, a stranger's client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA with a server (SAN 127.0.0.1, localhost) and a client cert; another CA's client."""
    folder = tmp_path_factory.mktemp("tls")
    ca_cert, ca_key = _make_ca("loratune test CA")
    server_cert, server_key = _make_leaf(ca_cert, ca_key, "localhost", server=True)
    client_cert, client_key = _make_leaf(ca_cert, ca_key, "loratune client", server=False)
    other_ca_cert, other_ca_key = _make_ca("some other CA")
    other_cert, other_key = _make_leaf(other_ca_cert, other_ca_key, "stranger", server=False)
    return Certificates(
        ca=_write_cert(ca_cert, folder / "ca.pem"),
        server_cert=_write_cert(server_cert, folder / "server.pem"),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_write_cert(client_cert, folder / "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        other_ca=_write_cert(other_ca_cert, folder / "other-ca.pem"),
        other_client_cert=_write_cert(other_cert, folder / "other-client.pem"),
        other_client_key=_write_key(other_key, folder / "other-client.key"),
    )
