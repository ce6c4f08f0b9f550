"""Server interceptors every service runs: status mapping with metrics, and bearer-token auth."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from services.common.errors import LoratuneError
from services.common.metrics import (
    GRPC_SERVER_HANDLED,
    GRPC_SERVER_HANDLING_SECONDS,
    GRPC_SERVER_STARTED,
)
from services.common.names import escape_control
from services.common.throttle import AuthThrottle, client_of_peer

__all__ = [
    "GENERIC_INTERNAL_MESSAGE",
    "HEALTH_METHOD_PREFIX",
    "MAX_STATUS_DETAILS_BYTES",
    "MAX_STATUS_DETAILS_CHARS",
    "UNAUTHENTICATED_MESSAGE",
    "AuthInterceptor",
    "StatusInterceptor",
    "status_code_of",
    "status_details",
]

logger = logging.getLogger(__name__)

GENERIC_INTERNAL_MESSAGE = "internal error; see the server log"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"

if TYPE_CHECKING:
    # grpc-stubs make these generic; at run time they are plain classes.
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _HandlerCallDetails = grpc.HandlerCallDetails
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

_Behaviour = Callable[..., Any]
_STATUS_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}

# Details travel in the grpc-message trailer, percent-encoded (up to 3 bytes per UTF-8
# byte); peers refuse metadata over 8 KiB by default, and a refused trailer reaches the
# client as RESOURCE_EXHAUSTED instead of the real code. These bounds keep it far below.
MAX_STATUS_DETAILS_CHARS = 1000
MAX_STATUS_DETAILS_BYTES = 2000


def status_details(message: str) -> str:
    """``message`` made safe for a status: control characters escaped, length bounded.

    Longer than ``MAX_STATUS_DETAILS_CHARS`` characters or ``MAX_STATUS_DETAILS_BYTES``
    UTF-8 bytes, it is cut and ends with ``... [cut, N chars in all]``.
    """
    escaped = escape_control(message)
    if len(escaped) <= MAX_STATUS_DETAILS_CHARS:
        encoded = escaped.encode("utf-8")
        if len(encoded) <= MAX_STATUS_DETAILS_BYTES:
            return escaped
    marker = f"... [cut, {len(escaped)} chars in all]"
    head = escaped[: MAX_STATUS_DETAILS_CHARS - len(marker)]
    # A cut inside a multi-byte character drops that character's leftover bytes.
    head_bytes = head.encode("utf-8")[: MAX_STATUS_DETAILS_BYTES - len(marker)]
    return head_bytes.decode("utf-8", "ignore") + marker


def status_code_of(error: LoratuneError) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to (``UNKNOWN`` for an unmapped name)."""
    return _STATUS_BY_NAME.get(error.code, grpc.StatusCode.UNKNOWN)


def _split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service, method) if service else ("unknown", method)


def _cancelled_code(context: _Context) -> grpc.StatusCode:
    """Why a cancelled RPC ended: its deadline passed, or the client gave up."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _RpcObservation:
    """Metrics of one RPC: counted as started on creation, as handled exactly once."""

    __slots__ = ("_method", "_recorded", "_service", "_started")

    def __init__(self, service: str, method: str) -> None:
        self._service = service
        self._method = method
        self._started = time.perf_counter()
        self._recorded = False
        GRPC_SERVER_STARTED.labels(service, method).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        if self._recorded:
            return
        self._recorded = True
        GRPC_SERVER_HANDLED.labels(self._service, self._method, code.name).inc()
        GRPC_SERVER_HANDLING_SECONDS.labels(self._service, self._method).observe(
            time.perf_counter() - self._started
        )


class _StatusGuard:
    """Turns what a handler raised into a status, and remembers the final code."""

    def __init__(self, full_method: str, context: _Context) -> None:
        self.full_method = full_method
        self.context = context
        self.code: grpc.StatusCode | None = None

    def completed(self) -> None:
        """The handler returned: OK unless it set a code itself."""
        self.code = self.context.code() or grpc.StatusCode.OK

    def aborted(self) -> None:
        """The handler (or an inner interceptor) called ``context.abort``."""
        self.code = self.context.code() or grpc.StatusCode.UNKNOWN

    def cancelled(self) -> None:
        """The RPC was cancelled under the handler (client gone, deadline, shutdown)."""
        self.code = _cancelled_code(self.context)

    async def abort_domain(self, error: LoratuneError) -> NoReturn:
        """Abort with the domain error's status; its message says what and which field.

        The message may echo request text: it is escaped and bounded (``status_details``).
        """
        self.code = status_code_of(error)
        details = status_details(str(error))
        logger.info("%s -> %s: %s", self.full_method, self.code.name, details)
        await self.context.abort(self.code, details)

    async def abort_unexpected(self) -> NoReturn:
        """Abort with a generic INTERNAL; the traceback goes to the log, never the client."""
        self.code = grpc.StatusCode.INTERNAL
        logger.exception("unexpected error in %s", self.full_method)
        await self.context.abort(self.code, GENERIC_INTERNAL_MESSAGE)

    def final_code(self) -> grpc.StatusCode:
        """The code to record; a handler left without any outcome was cancelled."""
        return self.code if self.code is not None else _cancelled_code(self.context)


def _unary_response_behaviour(
    inner: _Behaviour, full_method: str, service: str, method: str
) -> _Behaviour:
    """Wraps a unary-unary or stream-unary behaviour."""

    async def behaviour(request: Any, context: _Context) -> Any:
        observation = _RpcObservation(service, method)
        guard = _StatusGuard(full_method, context)
        try:
            result = inner(request, context)
            if inspect.isawaitable(result):
                result = await result
            guard.completed()
            return result
        except grpc.aio.AbortError:
            guard.aborted()
            raise
        except LoratuneError as error:
            await guard.abort_domain(error)
        except asyncio.CancelledError:
            guard.cancelled()
            raise
        except Exception:
            await guard.abort_unexpected()
        finally:
            observation.finish(guard.final_code())

    return behaviour


def _stream_response_behaviour(
    inner: _Behaviour, full_method: str, service: str, method: str
) -> _Behaviour:
    """Wraps a unary-stream or stream-stream behaviour, keeping its style.

    grpc.aio tells the two styles apart by the function's type: a coroutine function
    writes with ``context.write`` (like the health service's Watch), anything else
    returns an iterator of responses. The wrapper must be of the same kind.
    """
    if inspect.iscoroutinefunction(inner):

        async def writer_behaviour(request: Any, context: _Context) -> None:
            observation = _RpcObservation(service, method)
            guard = _StatusGuard(full_method, context)
            try:
                await inner(request, context)
                guard.completed()
            except grpc.aio.AbortError:
                guard.aborted()
                raise
            except LoratuneError as error:
                await guard.abort_domain(error)
            except asyncio.CancelledError:
                guard.cancelled()
                raise
            except Exception:
                await guard.abort_unexpected()
            finally:
                observation.finish(guard.final_code())

        return writer_behaviour

    async def generator_behaviour(request: Any, context: _Context) -> AsyncIterator[Any]:
        observation = _RpcObservation(service, method)
        guard = _StatusGuard(full_method, context)
        try:
            responses = inner(request, context)
            if hasattr(responses, "__aiter__"):
                try:
                    async for response in responses:
                        yield response
                finally:
                    # When the client goes away mid-stream, the inner generator's own
                    # finally blocks run now, not whenever it is garbage-collected.
                    aclose = getattr(responses, "aclose", None)
                    if aclose is not None:
                        await aclose()
            else:
                for response in responses:
                    yield response
            guard.completed()
        except grpc.aio.AbortError:
            guard.aborted()
            raise
        except LoratuneError as error:
            await guard.abort_domain(error)
        except asyncio.CancelledError:
            guard.cancelled()
            raise
        except GeneratorExit:
            # The server stopped pulling responses: the RPC ended under us.
            guard.cancelled()
            raise
        except Exception:
            await guard.abort_unexpected()
        finally:
            observation.finish(guard.final_code())

    return generator_behaviour


def _behaviour_of(handler: _Handler) -> _Behaviour:
    """The one behaviour function a method handler carries, whatever its kind."""
    behaviour = (
        handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary
    )
    if behaviour is None:
        raise TypeError("an RPC method handler without a behaviour")
    return behaviour


def _wrap_handler(handler: _Handler, full_method: str) -> _Handler:
    service, method = _split_method(full_method)
    inner = _behaviour_of(handler)
    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _stream_response_behaviour(inner, full_method, service, method), **kwargs
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response_behaviour(inner, full_method, service, method), **kwargs
        )
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response_behaviour(inner, full_method, service, method), **kwargs
        )
    return grpc.unary_unary_rpc_method_handler(
        _unary_response_behaviour(inner, full_method, service, method), **kwargs
    )


class StatusInterceptor(_ServerInterceptor):
    """Maps domain errors to status codes and records the ``grpc_server_*`` metrics.

    A ``LoratuneError`` becomes its ``code`` with ``str(error)`` as details (escaped and
    bounded by ``status_details``); any other exception becomes ``INTERNAL`` with a
    generic message and its traceback in the log. Every RPC of a known method is
    counted by its final code, including aborts by handlers or inner interceptors
    (auth) and cancellations. Unknown methods are not counted: their names come from
    clients, and labels must stay bounded.
    Put it first (outermost) so that it sees every outcome.
    """

    # grpc-stubs declare a non-Optional handler; grpc itself passes None for unknown methods.
    async def intercept_service(  # type: ignore[override]
        self, continuation: _Continuation, handler_call_details: _HandlerCallDetails
    ) -> _Handler | None:
        """Wrap the method's handler; unknown methods pass through untouched."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, handler_call_details.method)


def _metadata_values(metadata: Iterable[Any] | None, key: str) -> list[str]:
    values: list[str] = []
    for item in metadata or ():
        item_key, item_value = item[0], item[1]
        if item_key.lower() == key:
            values.append(
                item_value.decode("utf-8", "replace")
                if isinstance(item_value, bytes)
                else str(item_value)
            )
    return values


class AuthInterceptor(_ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every method but the health service's.

    A missing or wrong token is ``UNAUTHENTICATED`` before any servicer code runs. Wrong
    tokens slow their client address down (``throttle.AuthThrottle``): past a few, every
    call from it is ``RESOURCE_EXHAUSTED`` with a ``retry-after`` trailer (seconds) until
    its delay passes, its token not even compared; other addresses are not affected.
    Place it after ``StatusInterceptor`` so rejected calls are counted too.
    """

    def __init__(
        self,
        token: str,
        *,
        exempt_prefixes: tuple[str, ...] = (HEALTH_METHOD_PREFIX,),
        throttle: AuthThrottle | None = None,
    ) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._token = token.encode("utf-8")
        self._exempt_prefixes = exempt_prefixes
        self.throttle = throttle or AuthThrottle()

    def _authorized(self, metadata: Iterable[Any] | None) -> bool:
        for value in _metadata_values(metadata, "authorization"):
            scheme, _, credentials = value.partition(" ")
            # compare_digest: the time taken must not tell how much of the token matched.
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode("utf-8"), self._token
            ):
                return True
        return False

    # grpc-stubs declare a non-Optional handler; grpc itself passes None for unknown methods.
    async def intercept_service(  # type: ignore[override]
        self, continuation: _Continuation, handler_call_details: _HandlerCallDetails
    ) -> _Handler | None:
        """Pass authorised and exempt calls on; answer the rest ``UNAUTHENTICATED``."""
        method = handler_call_details.method
        if method.startswith(self._exempt_prefixes):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        authorized = self._authorized(metadata)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if authorized and not self.throttle.any_blocked():
            return handler  # the fast path: nobody is being slowed down
        given = bool(_metadata_values(metadata, "authorization"))
        return _gated_handler(handler, method, authorized, given, self.throttle)


def _gated_handler(
    handler: _Handler, method: str, authorized: bool, given: bool, throttle: AuthThrottle
) -> _Handler:
    """``handler`` behind the throttle's check of the caller's address (known only at call
    time, from the context's peer) and, for a caller without the token, its refusal."""
    inner = _behaviour_of(handler)

    async def gate(context: _Context) -> None:
        client = client_of_peer(context.peer())
        wait = throttle.retry_after(client)
        if wait is not None:
            throttle.refused("grpc")
            context.set_trailing_metadata((("retry-after", str(wait)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many failed authentications from this address; retry after {wait} s",
            )
        if not authorized:
            if given:  # a wrong token, not a missing one: a guess
                throttle.failed(client, "grpc")
            logger.warning("rejected %s: %s", method, UNAUTHENTICATED_MESSAGE)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        throttle.succeeded(client)

    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:

        async def streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
            await gate(context)
            responses = inner(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            elif inspect.isawaitable(responses):  # a writer: it sends with context.write
                await responses
            else:
                for response in responses:
                    yield response

        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)

    async def unary(request: Any, context: _Context) -> Any:
        await gate(context)
        result = inner(request, context)
        return await result if inspect.isawaitable(result) else result

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
