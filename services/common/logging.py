"""Logging set-up for every service: plain or JSON lines, secrets redacted, one line a record."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from services.common.names import escape_control

__all__ = [
    "JsonFormatter",
    "PlainFormatter",
    "SecretRedactingFilter",
    "configure_logging",
    "register_secret",
    "registered_secret_count",
]

REDACTED = "***"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


def register_secret(value: str) -> None:
    """Redact ``value`` from every log record that passes a configured handler from now on."""
    if not value:
        return
    with _secrets_lock:
        _secrets.add(value)


def registered_secret_count() -> int:
    """How many distinct secrets are registered (for tests and diagnostics)."""
    with _secrets_lock:
        return len(_secrets)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class SecretRedactingFilter(logging.Filter):
    """Replaces registered secrets with ``***`` in a record's message and exception text.

    It rewrites the record in place (message rendered, args dropped, traceback
    pre-formatted), so every formatter downstream sees only the redacted text.
    """

    _exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record; never drops one."""
        with _secrets_lock:
            # Longest first, so a secret that contains another is replaced whole.
            secrets = sorted(_secrets, key=len, reverse=True)
        if not secrets:
            return True
        message = record.getMessage()
        redacted = _redact(message, secrets)
        if redacted != message:
            record.msg = redacted
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = _redact(record.stack_info, secrets)
        return True


def _escape_value(value: Any) -> Any:
    """A string ``extra=`` value with its control characters escaped; others as they are."""
    return escape_control(value) if isinstance(value, str) else value


def _json_default(value: Any) -> str:
    """What ``json.dumps`` writes for a value it cannot encode: its escaped ``str()``."""
    return escape_control(str(value))


class PlainFormatter(logging.Formatter):
    """``PLAIN_FORMAT`` lines whose message has its control characters escaped.

    Messages carry request text (ids, paths, names); a raw newline in one would forge
    a second log line and an ESC would drive the reader's terminal. So the message is
    always one line (see ``escape_control``). Tracebacks and stack traces, which
    come from our code, follow on their own lines as usual.
    """

    def __init__(self, fmt: str = PLAIN_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The format string applied to the record, its message escaped."""
        record.message = escape_control(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``exc_info``.

    Fields passed with ``extra=`` are added as they are (``str()`` when not JSON).
    The message and string extras have their control characters escaped as in
    ``PlainFormatter`` (JSON itself would let DEL, C1 controls and U+2028 through).
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": escape_control(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = _escape_value(value)
        return json.dumps(payload, default=_json_default, ensure_ascii=False)


class _LoratuneHandler(logging.StreamHandler[TextIO]):
    """The root handler ``configure_logging`` owns; its class marks it for idempotence."""


def configure_logging(fmt: str = "plain", level: str = "INFO") -> None:
    """Configure the root logger once: one stderr handler, ``fmt`` plain or json, redaction.

    Calling it again reconfigures that same handler (format, level, the current
    ``sys.stderr``) instead of adding another.
    """
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format must be 'plain' or 'json', not {fmt!r}")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _LoratuneHandler)), None)
    if handler is None:
        handler = _LoratuneHandler(sys.stderr)
        handler.addFilter(SecretRedactingFilter())
        root.addHandler(handler)
    elif handler.stream is not sys.stderr:
        # sys.stderr was replaced since (a test's capture, a daemon's redirect): follow it.
        # Not setStream(): it flushes the old stream, which may be closed by now.
        handler.acquire()
        try:
            with contextlib.suppress(ValueError, OSError):
                handler.stream.flush()
            handler.stream = sys.stderr
        finally:
            handler.release()
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else PlainFormatter()
    handler.setFormatter(formatter)
    root.setLevel(level.upper())
