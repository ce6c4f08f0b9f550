"""Run the console: an aiohttp server in front of one optimizer channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from loratune.optimizer.v1 import optimizer_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.console.app import build_app

__all__ = ["serve_console"]

logger = logging.getLogger(__name__)


async def serve_console(
    optimizer_address: str,
    *,
    host: str = "0.0.0.0",
    port: int = 8080,
    client: ClientSettings | None = None,
    started: asyncio.Future[int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT (or `stop` is set); `started` gets the bound port."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with create_channel(optimizer_address, client or ClientSettings.from_env()) as channel:
        stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
        runner = web.AppRunner(build_app(stub, optimizer_address), access_log=None)  # type: ignore[arg-type]
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            addresses = runner.addresses
            bound = int(addresses[0][1]) if addresses else port
            logger.info("console on http://%s:%d, optimizer %s", host, bound, optimizer_address)
            if started is not None and not started.done():
                started.set_result(bound)
            await stop.wait()
        finally:
            await runner.cleanup()
    logger.info("console stopped")
