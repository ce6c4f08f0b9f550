"""Turns a failed outbound gRPC call into the matching domain error, keeping its message."""

from __future__ import annotations

import grpc

from services.common import errors

_BY_CODE: dict[grpc.StatusCode, type[errors.LoratuneError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}


def error_from_rpc(err: grpc.aio.AioRpcError, service: str) -> errors.LoratuneError:
    """The domain error for `err`; `service` names the callee for messages that need context.

    NOT_FOUND keeps the callee's message as it is, because callers depend on its wording
    (e.g. "LLM Judge model not found ..."); other codes are prefixed with the callee.
    """
    code = err.code()
    details = err.details() or code.name
    cls = _BY_CODE.get(code, errors.Unavailable if code == grpc.StatusCode.UNKNOWN else None)
    if cls is None:
        return errors.Internal(f"{service} failed: {code.name}")
    if cls is errors.NotFound:
        return cls(details)
    return cls(f"{service}: {details}")
