"""The ``grpc.health.v1.Health`` service for grpc.aio, with watches that end on shutdown."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthServicer"]

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[Any, Any]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


# The generated grpc module has no stubs, so its base class is Any to mypy.
class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health checking as grpc's own asyncio servicer does it, but shutdown-aware.

    Unlike ``grpc_health.v1.health.aio.HealthServicer``, a ``Watch`` stream ends (after
    sending NOT_SERVING) once graceful shutdown begins: otherwise every open watch
    is an in-flight RPC that keeps the server in its grace period to the very end.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {
            "": _SERVING
        }
        self._changed = asyncio.Condition()
        self._shutting_down = False

    @property
    def shutting_down(self) -> bool:
        """Whether graceful shutdown has begun."""
        return self._shutting_down

    def status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """The status reported for ``service`` (SERVICE_UNKNOWN when never set)."""
        return self._statuses.get(service, _SERVICE_UNKNOWN)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: _Context
    ) -> health_pb2.HealthCheckResponse:
        """The service's current status; NOT_FOUND for a service never registered."""
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: _Context) -> None:
        """Stream the service's status on every change; end after shutdown begins."""
        last: health_pb2.HealthCheckResponse.ServingStatus.ValueType | None = None
        while True:
            async with self._changed:
                while (status := self.status(request.service)) == last and not self._shutting_down:
                    await self._changed.wait()
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                return

    async def set(
        self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        """Set ``service``'s status ("" = the whole server); ignored once shutting down."""
        async with self._changed:
            if self._shutting_down:
                return
            self._statuses[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on, and end open watches."""
        async with self._changed:
            self._shutting_down = True
            for service in self._statuses:
                self._statuses[service] = _NOT_SERVING
            self._changed.notify_all()
