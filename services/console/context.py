"""What every handler of the console reads from its application: the backends and options."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from loratune.judge.v1.judge_pb2_grpc import JudgeGatewayServiceAsyncStub
    from loratune.optimizer.v1.optimizer_pb2_grpc import OptimizerServiceAsyncStub

__all__ = [
    "BACKENDS",
    "DEFAULT_SESSION_SECONDS",
    "OPTIONS",
    "STOPPING",
    "ApiOptions",
    "Backends",
]

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_HEARTBEAT_SECONDS = 15.0
DEFAULT_SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Backends:
    """The services the console asks; ``judge`` is None when no gateway is configured."""

    optimizer: OptimizerServiceAsyncStub
    optimizer_address: str
    judge: JudgeGatewayServiceAsyncStub | None = None
    judge_address: str = ""


@dataclass(frozen=True)
class ApiOptions:
    """How the JSON API behaves.

    ``auth_token`` (LORATUNE_AUTH_TOKEN), when set, is required as ``Authorization: Bearer``
    on ``/api/`` and forwarded to the optimizer and the gateway; ``max_body_bytes`` bounds a
    request body (413 beyond); ``heartbeat_seconds`` is the longest an event stream stays
    silent (a comment line keeps proxies from closing it).
    """

    auth_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    session_seconds: int = DEFAULT_SESSION_SECONDS  # a sign-in's lifetime

    def __post_init__(self) -> None:
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token must not be empty")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, not {self.max_body_bytes}")
        if self.heartbeat_seconds <= 0:
            raise ValueError(f"heartbeat_seconds must be positive, not {self.heartbeat_seconds}")

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The gRPC metadata that carries the token on to the services (None without one)."""
        if self.auth_token is None:
            return None
        return (("authorization", f"Bearer {self.auth_token}"),)


BACKENDS: web.AppKey[Backends] = web.AppKey("backends", Backends)
OPTIONS: web.AppKey[ApiOptions] = web.AppKey("options", ApiOptions)
# Set when the console begins to stop: open event streams end, so that stopping need not
# wait for studies to finish (clients reconnect, to another replica).
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping", asyncio.Event)
