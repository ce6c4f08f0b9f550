"""The JSON API's errors: one body shape, the HTTP status from the shared table.

Every error under ``/api/`` answers ``{"error": {"code", "message", "field"?}}``: ``code`` is
the gRPC status name (``NOT_FOUND``, ...), the HTTP status is ``http_status_of(code)`` from
``services.common.errors`` (the table the gRPC side uses too), ``field`` names the request
field that was wrong when one was. Nothing unexpected reaches the body: no traceback, no
token, no callee's internal message; those go to the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message

from services.common.errors import http_status_of, split_field
from services.common.names import excerpt
from services.console.metrics import route_label

__all__ = [
    "ApiError",
    "api_error_from_rpc",
    "api_errors",
    "error_body",
    "invalid_argument",
    "names_a_field",
]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
GENERIC_MESSAGE = "internal error in the console; see its log"

# HTTP statuses aiohttp raises by itself (routing, body size), as status names.
_CODE_OF_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ApiError(Exception):
    """An error the API answers with; ``status`` defaults to the table's for ``code``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = http_status_of(code) if status is None else status
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.code, self.message, self.field)

    def response(self) -> web.Response:
        """The JSON response."""
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """``{"error": {"code": ..., "message": ..., "field": ...}}``, ``field`` only when known."""
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"error": error}


def invalid_argument(field: str, message: str) -> ApiError:
    """A 400 naming ``field``; the message leads with it, as the services' messages do."""
    return ApiError("INVALID_ARGUMENT", f"{field}: {message}", field=field)


_INDEX = re.compile(r"(\[\d+\])+$")


def names_a_field(descriptor: Any, path: str) -> bool:
    """Whether ``path`` (``dataset.uri``, ``search_space.target_modules[0].name``) is a field
    of the message ``descriptor`` describes."""
    parts = path.split(".")
    current = descriptor
    for part in parts:
        if current is None:
            return False  # a scalar field cannot have fields
        field = current.fields_by_name.get(_INDEX.sub("", part))
        if field is None:
            return False
        current = field.message_type
    return True


def api_error_from_rpc(
    err: grpc.aio.AioRpcError, service: str, request: Message | None = None
) -> ApiError:
    """The API's error for a failed call to ``service`` made with ``request``.

    A client's error (4xx: bad input, an unknown id, a wrong state, a full trainer, refused
    credentials) keeps the service's message verbatim, so "LLM Judge model not found ..."
    reaches the caller as it is; its leading ``field: `` is recovered when it names a field
    of ``request``. A 503 or 504 says which service; anything else (INTERNAL, UNKNOWN, ...)
    is a generic 500 naming the code, the service's details only in the log.
    """
    code = err.code().name
    status = http_status_of(code)
    details = err.details() or code
    if status < 500:
        field, _ = split_field(details)
        if field is not None and (request is None or not names_a_field(request.DESCRIPTOR, field)):
            field = None
        return ApiError(code, details, field=field)
    logger.warning("%s answered %s: %s", service, code, details)
    if code == "UNAVAILABLE":
        return ApiError(code, f"the {service} is unavailable: {details}")
    if code == "DEADLINE_EXCEEDED":
        return ApiError(code, f"the {service} did not answer in time")
    return ApiError(code, f"the {service} failed ({code}); see its log")


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/api/``, every failure as the JSON error (pages keep their own handling)."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as error:
        logger.info(
            "%s %s -> %d %s", request.method, route_label(request), error.status, error.code
        )
        return error.response()
    except grpc.aio.AioRpcError as err:  # a call a handler did not map itself
        return api_error_from_rpc(err, "optimizer").response()
    except web.HTTPException as http:
        if http.status < 400:
            raise
        code = _CODE_OF_HTTP.get(http.status, "INTERNAL" if http.status >= 500 else "UNKNOWN")
        message = {
            404: f"no such endpoint: {request.method} {excerpt(request.path, 200)}",
            405: f"{request.method} is not allowed here",
        }.get(http.status, http.text or http.reason)
        headers = {"Allow": http.headers["Allow"]} if "Allow" in http.headers else None
        return web.json_response(error_body(code, message), status=http.status, headers=headers)
    except Exception:
        logger.exception("unexpected error in %s %s", request.method, route_label(request))
        return web.json_response(error_body("INTERNAL", GENERIC_MESSAGE), status=500)
