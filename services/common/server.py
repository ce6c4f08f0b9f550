"""The one server bootstrap: interceptors, health, reflection, metrics, TLS, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config import CommonSettings
from services.common.health import HealthServicer
from services.common.interceptors import AuthInterceptor, StatusInterceptor
from services.common.logging import configure_logging, register_secret
from services.common.metrics import MetricsServer, start_metrics_server

__all__ = [
    "RunningServer",
    "ServiceDefinition",
    "run",
    "serve",
    "serve_until_signal",
    "start_server",
]

logger = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServiceDefinition:
    """One gRPC service to host: its full name, how to register it, what to release on stop.

    ``full_name`` comes from the descriptor, e.g.
    ``evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name``;
    ``register`` adds the servicer, e.g.
    ``lambda s: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, s)``;
    ``on_stop`` runs after the server has stopped (release models, close clients);
    ``on_start`` runs once the server is serving, with it (e.g. so a service can turn its
    own health to NOT_SERVING later through ``RunningServer.set_serving``);
    ``on_stopping`` runs as soon as stopping begins, health already NOT_SERVING and the
    server still answering, with the seconds it may take (e.g. the trainer ends its job
    between steps so that its watchers still receive why).
    """

    full_name: str
    register: Callable[[grpc.aio.Server], None]
    on_stop: Callable[[], Awaitable[None]] | None = None
    on_start: Callable[[RunningServer], None] | None = None
    on_stopping: Callable[[float], Awaitable[None]] | None = None


def _host_port(host: str, port: int) -> str:
    # An IPv6 literal needs brackets before the port.
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _read_file(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise RuntimeError(f"{variable}: cannot read {path}: {error.strerror}") from error


def _server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for a plaintext port."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = _read_file(settings.tls_cert, "LORATUNE_TLS_CERT")
    key = _read_file(settings.tls_key, "LORATUNE_TLS_KEY")
    client_ca = (
        _read_file(settings.tls_client_ca, "LORATUNE_TLS_CLIENT_CA")
        if settings.tls_client_ca is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class RunningServer:
    """A started server; ``stop`` shuts it down gracefully, once."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        health_servicer: HealthServicer,
        services: Sequence[ServiceDefinition],
        host: str,
        port: int,
        metrics: MetricsServer | None,
        settings: CommonSettings,
    ) -> None:
        self._server = server
        self._health = health_servicer
        self._services = tuple(services)
        self._metrics = metrics
        self._settings = settings
        self._stop_task: asyncio.Task[None] | None = None
        self._terminated = asyncio.Event()
        self.host = host
        self.port = port
        self.metrics_port = metrics.port if metrics is not None else None
        self.address = _host_port(host, port)

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` has been called."""
        return self._stop_task is not None

    async def set_serving(self, service: str, serving: bool) -> None:
        """Report ``service`` ("" = the whole server) SERVING or NOT_SERVING on health.

        Ignored once stop has begun: a stopping server stays NOT_SERVING.
        """
        await self._health.set(service, _SERVING if serving else _NOT_SERVING)

    async def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """Stop gracefully; later and concurrent calls wait for the first one.

        Health turns NOT_SERVING for every service first. The server then keeps
        answering for ``drain`` seconds (default ``shutdown_drain_seconds``), so health
        checks and watchers see NOT_SERVING and move away; then it refuses new calls and
        gives in-flight ones the rest of ``grace`` (default ``grace_period_seconds``)
        before cancelling them. Each service's ``on_stop`` runs after that, then the
        metrics endpoint closes.
        """
        if self._stop_task is None:
            grace = self._settings.grace_period_seconds if grace is None else grace
            drain = self._settings.shutdown_drain_seconds if drain is None else drain
            self._stop_task = asyncio.ensure_future(self._stop(grace, min(drain, grace)))
        # shield: a caller that is cancelled must not abandon the shutdown half-way.
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float, drain: float) -> None:
        logger.info("stopping %s (grace %.1fs, drain %.1fs)", self.address, grace, drain)
        try:
            await self._health.enter_graceful_shutdown()
            started = time.monotonic()
            # Leave a second of the grace period for the server to deliver what they emit.
            budget = max(grace - drain - 1.0, 0.0)
            for service in self._services:
                if service.on_stopping is None:
                    continue
                try:
                    await asyncio.wait_for(service.on_stopping(budget), timeout=budget or None)
                except TimeoutError:
                    logger.warning(
                        "%s did not stop its work within %.1fs", service.full_name, budget
                    )
                except Exception:
                    logger.exception("on_stopping of %s failed", service.full_name)
            used = time.monotonic() - started
            if drain > used:
                await asyncio.sleep(drain - used)
            await self._server.stop(max(grace - max(drain, used), 0.0))
            for service in self._services:
                if service.on_stop is None:
                    continue
                try:
                    await service.on_stop()
                except Exception:
                    # One service failing to clean up must not keep the others from it.
                    logger.exception("on_stop of %s failed", service.full_name)
            if self._metrics is not None:
                # shutdown() blocks until the serving thread notices (up to 0.5 s).
                await asyncio.to_thread(self._metrics.stop)
        finally:
            self._terminated.set()
        logger.info("stopped %s", self.address)

    async def wait_for_termination(self) -> None:
        """Wait until ``stop`` has finished."""
        await self._terminated.wait()


def _interceptors(
    settings: CommonSettings, extra: Sequence[grpc.aio.ServerInterceptor[Any, Any]]
) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    # The status interceptor is outermost so it sees, maps and counts every outcome,
    # including the auth interceptor's UNAUTHENTICATED; auth still rejects a call
    # before any servicer code runs.
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [StatusInterceptor()]
    if settings.auth_token is not None:
        token = settings.auth_token.get_secret_value()
        register_secret(token)
        interceptors.append(AuthInterceptor(token))
    interceptors.extend(extra)
    return interceptors


async def start_server(
    services: Sequence[ServiceDefinition],
    settings: CommonSettings,
    *,
    host: str | None = None,
    port: int = 0,
    metrics_port: int | None = 0,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
) -> RunningServer:
    """Start a grpc.aio server hosting ``services`` with health, reflection and metrics.

    ``host`` defaults to ``settings.host``; ``port`` 0 binds a free port (see
    ``RunningServer.port``); ``metrics_port`` None serves no metrics, 0 a free port.
    """
    names = [service.full_name for service in services]
    if len(set(names)) != len(names):
        raise ValueError(f"a service is listed twice: {names}")
    bind_host = settings.host if host is None else host
    server = grpc.aio.server(
        interceptors=_interceptors(settings, extra_interceptors),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Without this, a second server on a taken port binds too and they split calls.
            ("grpc.so_reuseport", 0),
        ],
    )
    for service in services:
        service.register(server)

    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *names):
        await health_servicer.set(name, _SERVING)

    if settings.reflection:
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )

    address = _host_port(bind_host, port)
    credentials = _server_credentials(settings)
    try:
        if credentials is None:
            bound_port = server.add_insecure_port(address)
        else:
            bound_port = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {address}: {error}") from error
    if bound_port == 0:
        raise RuntimeError(f"cannot listen on {address}")

    metrics = start_metrics_server(bind_host, metrics_port) if metrics_port is not None else None
    try:
        await server.start()
    except BaseException:
        if metrics is not None:
            metrics.stop()
        raise

    running = RunningServer(
        server=server,
        health_servicer=health_servicer,
        services=services,
        host=bind_host,
        port=bound_port,
        metrics=metrics,
        settings=settings,
    )
    for service in services:
        if service.on_start is not None:
            service.on_start(running)
    logger.info(
        "listening on %s (tls=%s, mtls=%s, auth=%s, reflection=%s, metrics=%s) serving %s",
        running.address,
        settings.tls_enabled,
        settings.mtls_enabled,
        settings.auth_token is not None,
        settings.reflection,
        running.metrics_port,
        ", ".join(names) or "health only",
    )
    return running


class _Stoppable(Protocol):
    """What ``serve_until_signal`` runs: anything with an awaitable ``stop()``."""

    async def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Stoppable)


async def serve_until_signal(
    start: Callable[[], Awaitable[_S]],
    *,
    started: Callable[[_S], None] | None = None,
) -> int:
    """Run what ``start`` returns until SIGTERM or SIGINT, then ``stop()`` it; returns 0.

    The handlers are installed before ``start`` runs, so a signal during start-up stops
    it as soon as it is up; a second signal only logs. ``started`` runs once it is up
    (e.g. to print where it listens). One server (``serve``) or several (the CLI's local
    stack) stop this one way.
    """
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop_requested.is_set():
            logger.info("%s received again; already stopping", signum.name)
            return
        logger.info("%s received; stopping", signum.name)
        stop_requested.set()

    handled: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):
            # No signal handlers outside the main thread or on Windows' loop.
            logger.debug("cannot handle %s here", signum.name)
    try:
        running = await start()
        try:
            if started is not None:
                started(running)
            await stop_requested.wait()
        finally:
            await running.stop()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return 0


async def serve(
    services: Sequence[ServiceDefinition],
    settings: CommonSettings,
    *,
    port: int,
    metrics_port: int | None,
    host: str | None = None,
) -> int:
    """Run ``services`` until SIGTERM or SIGINT, then stop gracefully; returns the exit code."""
    return await serve_until_signal(
        lambda: start_server(services, settings, port=port, metrics_port=metrics_port, host=host)
    )


def run(
    services_factory: Callable[[], Sequence[ServiceDefinition]],
    settings: CommonSettings,
    *,
    port: int,
    metrics_port: int | None,
    host: str | None = None,
) -> int:
    """Entry point for a ``main.py``: configure logging, build services in the loop, serve.

    The factory runs inside the event loop, so servicers may create asyncio objects
    and clients there. Returns the process exit code.
    """
    configure_logging(settings.log_format, settings.log_level)

    async def main() -> int:
        return await serve(
            services_factory(), settings, port=port, metrics_port=metrics_port, host=host
        )

    return asyncio.run(main())
