"""What the provider adapters share: status mapping, Retry-After, redaction, transport errors."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterable

import httpx

from services.judge_gateway.core.providers.base import ProviderError, ProviderErrorKind

# Longest provider message carried into a ProviderError: enough to diagnose, not a dump.
_MESSAGE_LIMIT = 300
_REDACTED = "[redacted]"
_VERSION_SEGMENT = re.compile(r"/(v\d+[a-z0-9]*)/?$")


def kind_for_status(status: int) -> ProviderErrorKind:
    """The failure class of an HTTP error status."""
    if status == 401:
        return ProviderErrorKind.UNAUTHENTICATED
    if status == 403:
        return ProviderErrorKind.PERMISSION_DENIED
    if status == 404:
        return ProviderErrorKind.MODEL_NOT_FOUND
    if status == 408:
        return ProviderErrorKind.TIMEOUT
    if status == 429:
        return ProviderErrorKind.RATE_LIMITED
    if 400 <= status < 500:
        return ProviderErrorKind.BAD_REQUEST
    # 5xx, and anything a well-behaved API never answers (1xx, 3xx): the server's fault.
    return ProviderErrorKind.SERVER


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP date (RFC 9110).

    None when absent or unreadable; never negative.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # an HTTP date is always GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def parse_duration(value: object) -> float | None:
    """Seconds from a protobuf Duration in JSON (`"7s"`, `"0.250s"`); None if unreadable."""
    if not isinstance(value, str) or not value.endswith("s"):
        return None
    try:
        seconds = float(value[:-1])
    except ValueError:
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret replaced, and cut to a readable length."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, _REDACTED)
    if len(text) > _MESSAGE_LIMIT:
        text = text[:_MESSAGE_LIMIT] + "..."
    return text


def api_version_from_url(url: str, default: str) -> str:
    """The `vN` path segment that ends a base URL (`.../api/v1` -> `v1`), else `default`."""
    match = _VERSION_SEGMENT.search(httpx.URL(url).path)
    return match.group(1) if match else default


# The pool of a provider's httpx client. The gateway's caps bound the calls in flight,
# and the pool keeps a connection for each: httpx's default keeps 20 alive and, while
# more than 20 are open, closes every connection a call frees, so under a cap above 20
# nearly every call opened a new connection (a TLS handshake, on a real provider).
POOL_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=None)

# What a failed exchange raises below the HTTP layer: httpx's errors (timeouts included),
# and OSError, whose subclass TimeoutError is what an asyncio deadline raises.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.TransportError, OSError)


def transport_error(
    provider: str, exc: BaseException, secrets: Iterable[str | None]
) -> ProviderError:
    """A TIMEOUT or TRANSPORT ProviderError for one of TRANSPORT_ERRORS."""
    detail = redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, secrets)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return ProviderError(ProviderErrorKind.TIMEOUT, f"{provider}: no answer in time ({detail})")
    return ProviderError(ProviderErrorKind.TRANSPORT, f"{provider}: connection failed ({detail})")
