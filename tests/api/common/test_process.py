"""A real server process: started by run(), stopped by SIGTERM within its grace period."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratune.evaluator.v1 import evaluator_pb2_grpc
from services.common.client import create_channel, wait_for_ready

SCRIPT = Path(__file__).with_name("serve_fake_evaluator.py")
ROOT = Path(__file__).resolve().parents[3]
GRACE = 5.0


async def read_until(stream: asyncio.StreamReader, pattern: str, within: float) -> tuple[str, str]:
    """Read log lines until one matches; returns (all lines so far, the match's first group)."""
    seen = ""
    async with asyncio.timeout(within):
        while line := (await stream.readline()).decode():
            seen += line
            if match := re.search(pattern, line):
                return seen, match.group(1)
    raise AssertionError(f"{pattern!r} never logged:\n{seen}")


async def test_sigterm_stops_gracefully_letting_the_in_flight_call_finish(
    make_request: Callable[[str], Any],
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "protos"), os.environ.get("PYTHONPATH", "")]
        ),
        "LORATUNE_HOST": "127.0.0.1",
        "LORATUNE_GRACE_PERIOD_SECONDS": str(GRACE),
        "LORATUNE_LOG_FORMAT": "plain",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        log, port = await read_until(process.stderr, r"listening on 127\.0\.0\.1:(\d+)", 20)
        async with create_channel(f"127.0.0.1:{port}") as channel:
            await wait_for_ready(channel, "loratune.evaluator.v1.EvaluatorService", timeout=10)
            request = make_request("0.5")
            in_flight = asyncio.ensure_future(
                evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(request)
            )
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            process.send_signal(signal.SIGTERM)
            response = await in_flight
            assert response.result.objective == 0.5
            returncode = await asyncio.wait_for(process.wait(), GRACE + 2)
            assert loop.time() - signalled < GRACE
        assert returncode == 0
        rest = (await process.stderr.read()).decode()
        assert "SIGTERM received; stopping" in rest
        assert "fake evaluator released" in rest
        assert "Traceback" not in log + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
