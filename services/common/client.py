"""Client channels for the CLI and for services calling each other: TLS, token, retries."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "ClientSettings",
    "ServerNotReadyError",
    "create_channel",
    "wait_for_ready",
]

logger = logging.getLogger(__name__)

# gRPC ignores a retry policy with more attempts than this.
_MAX_GRPC_ATTEMPTS = 5

if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryInterceptor = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamInterceptor = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStreamInterceptor = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnaryInterceptor = grpc.aio.StreamUnaryClientInterceptor
    _StreamStreamInterceptor = grpc.aio.StreamStreamClientInterceptor


class ServerNotReadyError(TimeoutError):
    """The server did not report SERVING in time."""


def _path(environ: Mapping[str, str], name: str) -> Path | None:
    value = environ.get(name, "").strip()
    return Path(value) if value else None


@dataclass(frozen=True)
class ClientSettings:
    """How to reach a loratune server: credentials, TLS, deadlines, retries.

    ``ca_cert`` (or a client certificate) turns TLS on; ``client_cert`` with
    ``client_key`` is mutual TLS; ``server_name`` overrides the name checked against
    the server's certificate. ``default_timeout`` applies to unary calls that set
    none; ``default_stream_timeout`` to server-streaming calls (None: watch streams
    live as long as what they watch).
    """

    token: str | None = field(default=None, repr=False)
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    default_timeout: float = 30.0
    default_stream_timeout: float | None = None
    max_attempts: int = 4
    max_message_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError(
                "LORATUNE_TLS_CLIENT_CERT and LORATUNE_TLS_CLIENT_KEY must be set together"
            )
        if not 1 <= self.max_attempts <= _MAX_GRPC_ATTEMPTS:
            raise ValueError(
                f"max_attempts must be 1..{_MAX_GRPC_ATTEMPTS}, not {self.max_attempts}"
            )
        if self.default_timeout <= 0:
            raise ValueError(f"default_timeout must be positive, not {self.default_timeout}")

    @property
    def tls(self) -> bool:
        """Whether channels use TLS."""
        return self.ca_cert is not None or self.client_cert is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSettings:
        """Settings from ``LORATUNE_AUTH_TOKEN``, ``LORATUNE_TLS_CA``, ``LORATUNE_TLS_CLIENT_CERT``,
        ``LORATUNE_TLS_CLIENT_KEY`` and ``LORATUNE_TLS_SERVER_NAME`` (empty = unset).
        """
        env = os.environ if environ is None else environ
        return cls(
            token=env.get("LORATUNE_AUTH_TOKEN", "").strip() or None,
            ca_cert=_path(env, "LORATUNE_TLS_CA"),
            client_cert=_path(env, "LORATUNE_TLS_CLIENT_CERT"),
            client_key=_path(env, "LORATUNE_TLS_CLIENT_KEY"),
            server_name=env.get("LORATUNE_TLS_SERVER_NAME", "").strip() or None,
        )


def _with_timeout(
    details: grpc.aio.ClientCallDetails, timeout: float
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method, timeout, details.metadata, details.credentials, details.wait_for_ready
    )


class _DefaultTimeoutInterceptor(_UnaryUnaryInterceptor, _UnaryStreamInterceptor):
    """Gives calls that set no timeout a default deadline, so none waits forever."""

    def __init__(self, unary_timeout: float, stream_timeout: float | None) -> None:
        self._unary_timeout = unary_timeout
        self._stream_timeout = stream_timeout

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Add the unary default deadline when the call has none."""
        if client_call_details.timeout is None:
            client_call_details = _with_timeout(client_call_details, self._unary_timeout)
        return await continuation(client_call_details, request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Add the stream default deadline, if any, when the call has none."""
        if client_call_details.timeout is None and self._stream_timeout is not None:
            client_call_details = _with_timeout(client_call_details, self._stream_timeout)
        return await continuation(client_call_details, request)


class _BearerTokenInterceptor(
    _UnaryUnaryInterceptor,
    _UnaryStreamInterceptor,
    _StreamUnaryInterceptor,
    _StreamStreamInterceptor,
):
    """Adds ``authorization: Bearer`` to every call on a plaintext channel.

    gRPC sends call credentials only over TLS, so a plaintext channel (loopback, a
    mesh that encrypts for us) carries the token as plain metadata instead.
    """

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        metadata["authorization"] = self._value
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Add the token."""
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        """Add the token."""
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        """Add the token."""
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        """Add the token."""
        return await continuation(self._details(client_call_details), request_iterator)


def _service_config(max_attempts: int) -> str:
    method_config: dict[str, Any] = {"name": [{}]}
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.2s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method_config]})


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{variable}: cannot read {path}: {error.strerror}") from error


def create_channel(address: str, settings: ClientSettings | None = None) -> grpc.aio.Channel:
    """Open a channel to ``address`` (``host:port``) with TLS, token, retries and deadlines.

    Call it inside the event loop that will use the channel; close it when done.
    """
    settings = settings if settings is not None else ClientSettings()
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.enable_retries", 1 if settings.max_attempts > 1 else 0),
        ("grpc.service_config", _service_config(settings.max_attempts)),
    ]
    interceptors: list[Any] = [
        _DefaultTimeoutInterceptor(settings.default_timeout, settings.default_stream_timeout)
    ]
    if not settings.tls:
        if settings.token:
            interceptors.append(_BearerTokenInterceptor(settings.token))
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

    credentials = grpc.ssl_channel_credentials(
        root_certificates=(
            _read(settings.ca_cert, "LORATUNE_TLS_CA") if settings.ca_cert is not None else None
        ),
        private_key=(
            _read(settings.client_key, "LORATUNE_TLS_CLIENT_KEY")
            if settings.client_key is not None
            else None
        ),
        certificate_chain=(
            _read(settings.client_cert, "LORATUNE_TLS_CLIENT_CERT")
            if settings.client_cert is not None
            else None
        ),
    )
    if settings.token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(settings.token)
        )
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


# A timeout parameter rather than asyncio.timeout: the error then says what was seen last.
async def wait_for_ready(
    channel: grpc.aio.Channel, service_name: str = "", timeout: float = 10
) -> None:
    """Wait until the server behind ``channel`` reports ``service_name`` SERVING on health.

    Raises ``ServerNotReadyError`` after ``timeout`` seconds, saying what it saw last.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = f"service {service_name!r}" if service_name else "the server"
            raise ServerNotReadyError(f"{what} not SERVING after {timeout:g}s (last: {last})")
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service_name),
                timeout=remaining,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                last = "NOT_FOUND: the server does not know this service"
            else:
                last = f"{error.code().name}: {error.details()}"
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
