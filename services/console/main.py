"""The console's composition root: settings -> channels to the optimizer and gateway -> HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc
from aiohttp import web

from loratune.judge.v1 import judge_pb2_grpc
from loratune.optimizer.v1 import optimizer_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings
from services.common.logging import configure_logging, register_secret
from services.common.metrics import MetricsServer, start_metrics_server
from services.common.server import serve_until_signal
from services.console.app import build_app
from services.console.config import ConsoleSettings
from services.console.context import ApiOptions, Backends

__all__ = ["RunningConsole", "main", "serve_console", "start_console"]

logger = logging.getLogger(__name__)


class RunningConsole:
    """A started console: its HTTP port, its metrics port; ``stop`` closes it all, once."""

    def __init__(
        self,
        runner: web.AppRunner,
        channels: list[grpc.aio.Channel],
        metrics: MetricsServer | None,
        port: int,
    ) -> None:
        self._runner = runner
        self._channels = channels
        self._metrics = metrics
        self._stopped = False
        self.port = port
        self.metrics_port = metrics.port if metrics is not None else None

    async def stop(self) -> None:
        """Stop serving (open event streams end), close the channels and the metrics."""
        if self._stopped:
            return
        self._stopped = True
        await self._runner.cleanup()
        for channel in self._channels:
            await channel.close(None)
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.stop)
        logger.info("console stopped")


async def start_console(
    settings: ConsoleSettings,
    *,
    port: int,
    metrics_port: int | None = None,
    client: ClientSettings | None = None,
    auth_token: str | None = None,
) -> RunningConsole:
    """Serve the console on ``settings.host:port`` (0 = any free port) and, unless None,
    metrics on ``metrics_port``. ``auth_token`` turns the JSON API's bearer auth on."""
    if not settings.optimizer_address:
        raise ValueError("no optimizer address (LORATUNE_OPTIMIZER_ADDRESS)")
    client = client or ClientSettings.from_env()
    if auth_token:
        register_secret(auth_token)
    channels = [create_channel(settings.optimizer_address, client)]
    judge = None
    if settings.judge_address:
        channels.append(create_channel(settings.judge_address, client))
        judge = judge_pb2_grpc.JudgeGatewayServiceStub(channels[-1])
    backends = Backends(
        optimizer=optimizer_pb2_grpc.OptimizerServiceStub(channels[0]),
        optimizer_address=settings.optimizer_address,
        judge=judge,
        judge_address=settings.judge_address,
    )
    options = ApiOptions(
        auth_token=auth_token or None,
        max_body_bytes=settings.console_max_body_bytes,
        heartbeat_seconds=settings.console_heartbeat_seconds,
        session_seconds=settings.console_session_seconds,
    )
    # The access log is the metrics middleware's own line: no headers, no query string.
    runner = web.AppRunner(
        build_app(backends, options),
        access_log=None,
        shutdown_timeout=settings.grace_period_seconds,
    )
    await runner.setup()
    metrics = None
    try:
        site = web.TCPSite(runner, settings.host, port)
        await site.start()
        addresses = runner.addresses
        bound = int(addresses[0][1]) if addresses else port
        if metrics_port is not None:
            metrics = start_metrics_server(settings.host, metrics_port)
    except BaseException:
        await runner.cleanup()
        for channel in channels:
            await channel.close(None)
        raise
    logger.info(
        "console on http://%s:%d (auth=%s, metrics=%s), optimizer %s, judge gateway %s",
        settings.host,
        bound,
        options.auth_token is not None,
        metrics.port if metrics is not None else None,
        settings.optimizer_address,
        settings.judge_address or "none",
    )
    return RunningConsole(runner, channels, metrics, bound)


async def serve_console(
    optimizer_address: str,
    *,
    host: str = "0.0.0.0",
    port: int = 8080,
    client: ClientSettings | None = None,
    started: asyncio.Future[int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT (or `stop` is set); `started` gets the bound port.

    The console of the optimizer at ``optimizer_address`` alone: no judge gateway, no auth
    of its own, no metrics (``main`` serves all of those).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    settings = ConsoleSettings(optimizer_address=optimizer_address, judge_address="", host=host)
    console = await start_console(settings, port=port, client=client)
    try:
        if started is not None and not started.done():
            started.set_result(console.port)
        await stop.wait()
    finally:
        await console.stop()


def main(
    port: int,
    metrics_port: int | None,
    *,
    host: str | None = None,
    optimizer_address: str | None = None,
    judge_address: str | None = None,
) -> int:
    """Serve the console until SIGTERM / SIGINT; returns the exit code.

    Settings come from the environment; the arguments given override them.
    """
    common = CommonSettings()
    configure_logging(common.log_format, common.log_level)
    overrides = {
        "host": host,
        "optimizer_address": optimizer_address,
        "judge_address": judge_address,
    }
    settings = ConsoleSettings().model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    token = common.auth_token.get_secret_value() if common.auth_token is not None else None

    async def start() -> RunningConsole:
        return await start_console(settings, port=port, metrics_port=metrics_port, auth_token=token)

    def started(console: RunningConsole) -> None:
        logger.info("serving the console on port %d until SIGTERM", console.port)

    return asyncio.run(serve_until_signal(start, started=started))
