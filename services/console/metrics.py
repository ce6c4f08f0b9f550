"""Prometheus metrics of the console, and the middleware that records them with an access log.

Labels are bounded: the route's template (``/api/v1/studies/{study_id}``, never an id;
``unmatched`` for paths no route has), the method (the usual ones, else ``OTHER``) and the
status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

__all__ = ["EVENT_STREAMS", "HTTP_REQUESTS", "HTTP_REQUEST_SECONDS", "observe_requests"]

access_log = logging.getLogger("services.console.access")

HTTP_REQUESTS = Counter(
    "loratune_console_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "loratune_console_http_request_duration_seconds",
    "Time to answer an HTTP request (an event stream: how long it stayed open).",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
EVENT_STREAMS = Gauge(
    "loratune_console_event_streams", "Server-sent event streams of studies open now."
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_label(request: web.Request) -> str:
    """The template of the route that matched, or ``unmatched``."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count and time every request, and log one access line (no headers, no query)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as http:
        status = http.status
        raise
    finally:
        seconds = time.perf_counter() - started
        route = route_label(request)
        method = request.method if request.method in _METHODS else "OTHER"
        HTTP_REQUESTS.labels(route, method, str(status)).inc()
        HTTP_REQUEST_SECONDS.labels(route, method).observe(seconds)
        access_log.info("%s %s %d %.1fms", request.method, request.path, status, seconds * 1000)
