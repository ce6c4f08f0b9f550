"""Turns a failed outbound gRPC call into the matching domain error, keeping its message."""

from __future__ import annotations

import grpc

from services.common import errors


def error_from_rpc(err: grpc.aio.AioRpcError, service: str) -> errors.LoratuneError:
    """The domain error for `err`; `service` names the callee for messages that need context.

    The class comes from the one table in `errors` (`errors.error_class`). UNKNOWN (a
    callee that crashed mid-call) is `Unavailable`, so that it is retried; INTERNAL and
    codes without a class become a generic `Internal` naming the callee, never its details.
    NOT_FOUND keeps the callee's message as it is, because callers depend on its wording
    (e.g. "LLM Judge model not found ..."); other codes are prefixed with the callee.
    """
    code = err.code()
    details = err.details() or code.name
    cls = errors.Unavailable if code == grpc.StatusCode.UNKNOWN else errors.error_class(code.name)
    if cls is None or cls is errors.Internal:
        return errors.Internal(f"{service} failed: {code.name}")
    if cls is errors.NotFound:
        return cls(details)
    return cls(f"{service}: {details}")
