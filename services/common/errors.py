"""Domain errors that cores raise and the status interceptor maps to gRPC status codes."""

from __future__ import annotations

__all__ = [
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
]


class LoratuneError(Exception):
    """Base of every error a loratune core raises on purpose.

    ``code`` is the gRPC status name the error maps to, kept as a string so that
    cores need no ``grpc`` import. ``field`` names the request field that was wrong,
    when one was, and leads the message the client sees.
    """

    code: str = "UNKNOWN"

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


class NotFound(LoratuneError):
    """An id names nothing that exists."""

    code = "NOT_FOUND"


class AlreadyExists(LoratuneError):
    """Something with this id exists already and the request may not reuse it."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(LoratuneError):
    """The target is in the wrong state for the request."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(LoratuneError):
    """A capacity is full (a busy trainer) or a rate limit was hit."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(LoratuneError):
    """A dependency (a provider, another service) cannot be reached; retrying may help."""

    code = "UNAVAILABLE"


class DeadlineExceeded(LoratuneError):
    """The work did not finish in the time it was given."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(LoratuneError):
    """The caller's credentials are missing or wrong."""

    code = "UNAUTHENTICATED"


class PermissionDenied(LoratuneError):
    """The caller is known but may not do this."""

    code = "PERMISSION_DENIED"


class Cancelled(LoratuneError):
    """The work was cancelled before it finished."""

    code = "CANCELLED"


class Internal(LoratuneError):
    """An invariant broke; the message is safe to show to the client."""

    code = "INTERNAL"
