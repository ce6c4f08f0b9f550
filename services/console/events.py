"""``GET /api/v1/studies/{study_id}/events``: a study's WatchStudy stream as server-sent events.

One SSE event per ``StudyEvent``: ``id:`` its number in this stream (1, 2, ...), ``event:``
the case of its ``event`` oneof (``trial_started``, ``trial_progress``, ``trial_evaluated``,
``trial_finished``, ``study_finished``), ``data:`` the message as JSON on one line. A comment
line (``: heartbeat``) goes out after each ``heartbeat_seconds`` of silence, so proxies keep
the connection. The stream ends when the study ends (after ``study_finished``), or when
the console stops; a client that goes away cancels the gRPC call. An unknown study is a
404 before the stream starts; a failure during it is a last ``event: error`` with the
API's error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from loratune.optimizer.v1 import optimizer_pb2
from services.console.api import message_json, rpc
from services.console.context import BACKENDS, OPTIONS, STOPPING
from services.console.errors import api_error_from_rpc
from services.console.metrics import EVENT_STREAMS

__all__ = ["sse_event", "study_events"]

logger = logging.getLogger(__name__)

# How often a silent stream checks that its client is still there.
_CLIENT_CHECK_SECONDS = 0.5


def sse_event(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event: ``id:``, ``event:``, ``data:`` (JSON, one line), a blank line."""
    lines = [] if event_id is None else [f"id: {event_id}"]
    lines += [f"event: {event}", f"data: {json.dumps(data, ensure_ascii=False)}", "", ""]
    return "\n".join(lines).encode("utf-8")


def _over(request: web.Request) -> bool:
    """Whether the client has gone or the console is stopping."""
    transport = request.transport
    return transport is None or transport.is_closing() or request.app[STOPPING].is_set()


async def _next_or_silence(
    events: AsyncIterator[optimizer_pb2.StudyEvent],
    request: web.Request,
    heartbeat: float,
) -> AsyncGenerator[optimizer_pb2.StudyEvent | None, None]:
    """The stream's events, with None after each `heartbeat` seconds without one; stops when
    the stream ends, the client has gone or the console is stopping."""
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[optimizer_pb2.StudyEvent] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            silent_since = loop.time()
            while not pending.done():
                await asyncio.wait({pending}, timeout=_CLIENT_CHECK_SECONDS)
                if _over(request):
                    return
                if not pending.done() and loop.time() - silent_since >= heartbeat:
                    yield None
                    silent_since = loop.time()
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending


async def study_events(request: web.Request) -> web.StreamResponse:
    """The study's events as server-sent events until it ends (see the module's docstring)."""
    study_id = request.match_info["study_id"]
    optimizer = request.app[BACKENDS].optimizer
    options = request.app[OPTIONS]
    # Before any byte is sent: an unknown study or a refused token is a plain HTTP error.
    await rpc(
        request, "optimizer", optimizer.GetStudy, optimizer_pb2.GetStudyRequest(study_id=study_id)
    )
    watch = optimizer_pb2.WatchStudyRequest(study_id=study_id)
    call = optimizer.WatchStudy(watch, metadata=options.call_metadata())
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            # nginx and its kin would otherwise buffer the stream.
            "X-Accel-Buffering": "no",
        }
    )
    EVENT_STREAMS.inc()
    sent = 0
    try:
        await response.prepare(request)
        stream = _next_or_silence(call.__aiter__(), request, options.heartbeat_seconds)
        async with contextlib.aclosing(stream):
            async for event in stream:
                if event is None:
                    await response.write(b": heartbeat\n\n")
                    continue
                sent += 1
                kind = event.WhichOneof("event") or "message"
                await response.write(sse_event(kind, message_json(event), sent))
    except grpc.aio.AioRpcError as err:
        error = api_error_from_rpc(err, "optimizer", watch)
        with contextlib.suppress(ConnectionError):
            await response.write(sse_event("error", error.body()))
    except ConnectionError:
        logger.info("events of %s: the client went away after %d events", study_id, sent)
    finally:
        # The client gone, the study ended or a failure: the gRPC call ends here either way.
        call.cancel()
        EVENT_STREAMS.dec()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response
