"""Bearer-token auth of the JSON API, the way the gRPC services check LORATUNE_AUTH_TOKEN."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.common.interceptors import UNAUTHENTICATED_MESSAGE
from services.console.context import OPTIONS
from services.console.errors import API_PREFIX, ApiError

__all__ = ["OPEN_PATHS", "bearer_auth"]

# The API's description holds no data: tools fetch it without credentials.
OPEN_PATHS = frozenset({"/api/v1/openapi.json"})


def _authorized(header: str, token: bytes) -> bool:
    scheme, _, credentials = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8"), token
    )


@web.middleware
async def bearer_auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With a token configured, ``/api/`` needs ``Authorization: Bearer <token>`` (401 else).

    The header is never logged; the token goes on to the services as gRPC metadata
    (``ApiOptions.call_metadata``).
    """
    token = request.app[OPTIONS].auth_token
    if (
        token is None
        or not request.path.startswith(API_PREFIX)
        or request.path in OPEN_PATHS
        or _authorized(request.headers.get("Authorization", ""), token.encode("utf-8"))
    ):
        return await handler(request)
    raise ApiError(
        "UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE, headers={"WWW-Authenticate": "Bearer"}
    )
