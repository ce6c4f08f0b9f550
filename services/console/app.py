"""The console's aiohttp application: the JSON API, the event streams, the pages.

The console holds no state: every request is one or two calls to the optimizer (or the
judge gateway), with the client's TLS and deadlines, and the caller's token forwarded.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.common.throttle import AuthThrottle
from services.console import api, auth, pages
from services.console.auth import SESSIONS, THROTTLE, Sessions, bearer_auth
from services.console.context import BACKENDS, OPTIONS, STOPPING, ApiOptions, Backends
from services.console.errors import api_errors
from services.console.events import study_events
from services.console.metrics import observe_requests
from services.console.openapi import openapi_document

__all__ = ["REFRESH_SECONDS", "build_app"]

REFRESH_SECONDS = pages.REFRESH_SECONDS


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _stopping(app: web.Application) -> None:
    app[STOPPING].set()


def build_app(backends: Backends, options: ApiOptions | None = None) -> web.Application:
    """The console over ``backends``; ``options`` default to no auth and the usual limits."""
    options = options or ApiOptions()
    app = web.Application(
        # Outermost first: every request is counted; then API errors as JSON, auth, and
        # the pages' own error page.
        middlewares=[observe_requests, api_errors, bearer_auth, pages.page_errors],
        client_max_size=options.max_body_bytes,
    )
    app[BACKENDS] = backends
    app[OPTIONS] = options
    app[THROTTLE] = AuthThrottle()
    app[SESSIONS] = Sessions()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stopping)
    app.add_routes(
        [
            *api.routes(),
            web.get("/api/v1/studies/{study_id}/events", study_events),
            web.get("/api/v1/openapi.json", _openapi),
            *auth.routes(),
            *pages.routes(),
        ]
    )
    return app
