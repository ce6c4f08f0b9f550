"""Domain errors that cores raise, and the one table of what each means over gRPC and HTTP.

Each error class names its gRPC status (``code``: the status interceptor answers with it,
``rpc_errors`` turns a callee's status back into the class) and its HTTP status
(``http_status``: the console's JSON API answers with it). ``http_status_of`` reads the
table for any status name; codes without a class are 500 over HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "HTTP_STATUS_BY_CODE",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LoratuneError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "error_class",
    "http_status_of",
    "split_field",
]


class LoratuneError(Exception):
    """Base of every error a loratune core raises on purpose.

    ``code`` is the gRPC status name the error maps to, kept as a string so that
    cores need no ``grpc`` import; ``http_status`` is what it is over HTTP. ``field``
    names the request field that was wrong, when one was, and leads the message the
    client sees (``field: message``; ``split_field`` reads it back).
    """

    code: str = "UNKNOWN"
    http_status: int = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, field={self.field!r})"


class InvalidArgument(LoratuneError):
    """The request is malformed or a value is out of range."""

    code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(LoratuneError):
    """An id names nothing that exists."""

    code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(LoratuneError):
    """Something with this id exists already and the request may not reuse it."""

    code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(LoratuneError):
    """The target is in the wrong state for the request."""

    code = "FAILED_PRECONDITION"
    http_status = 409


class ResourceExhausted(LoratuneError):
    """A capacity is full (a busy trainer) or a rate limit was hit."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unavailable(LoratuneError):
    """A dependency (a provider, another service) cannot be reached; retrying may help."""

    code = "UNAVAILABLE"
    http_status = 503


class DeadlineExceeded(LoratuneError):
    """The work did not finish in the time it was given."""

    code = "DEADLINE_EXCEEDED"
    http_status = 504


class Unauthenticated(LoratuneError):
    """The caller's credentials are missing or wrong."""

    code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(LoratuneError):
    """The caller is known but may not do this."""

    code = "PERMISSION_DENIED"
    http_status = 403


class Cancelled(LoratuneError):
    """The work was cancelled before it finished."""

    code = "CANCELLED"
    http_status = 500


class Internal(LoratuneError):
    """An invariant broke; the message is safe to show to the client."""

    code = "INTERNAL"
    http_status = 500


# ---- the table ----------------------------------------------------------------------------

_CLASSES: tuple[type[LoratuneError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Unauthenticated,
    PermissionDenied,
    Cancelled,
    Internal,
)
_CLASS_BY_CODE: Mapping[str, type[LoratuneError]] = MappingProxyType(
    {cls.code: cls for cls in _CLASSES}
)

#: gRPC status name -> HTTP status, read off the classes above; any other code is 500.
HTTP_STATUS_BY_CODE: Mapping[str, int] = MappingProxyType(
    {cls.code: cls.http_status for cls in _CLASSES}
)


def error_class(code: str) -> type[LoratuneError] | None:
    """The domain error of a gRPC status name (``"NOT_FOUND"``); None for codes with none
    (``OK``, ``UNKNOWN``, ``ABORTED``, ...)."""
    return _CLASS_BY_CODE.get(code)


def http_status_of(code: str) -> int:
    """The HTTP status of a gRPC status name: its error's ``http_status``, else 500."""
    return HTTP_STATUS_BY_CODE.get(code, 500)


# A field path as errors name them: `project_id`, `dataset.uri`, `items[3].candidate`.
_FIELD_PREFIX = re.compile(
    r"(?P<field>[A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (?P<rest>.+)",
    re.DOTALL,
)


def split_field(details: str) -> tuple[str | None, str]:
    """The field and the rest of a status message written as ``str(error)`` (``field: ...``);
    ``(None, details)`` when it does not start with a field path.

    A message of its own may start with a word and a colon too ("evaluator: ..."): a
    caller that knows the request checks that the field is one of the request's.
    """
    match = _FIELD_PREFIX.fullmatch(details)
    if match is None:
        return None, details
    return match.group("field"), match.group("rest")
