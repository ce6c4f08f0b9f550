"""Logging set-up for every service: plain or JSON lines, with registered secrets redacted."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = [
    "JsonFormatter",
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, ``exc_info``.

    Fields passed with ``extra=`` are added as they are (``str()`` when not JSON).
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc_info"] = record.exc_text
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = value
        return json.dumps(payload, default=str, ensure_ascii=False)


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
    formatter: logging.Formatter = (
        JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT)
    )
    handler.setFormatter(formatter)
    root.setLevel(level.upper())
