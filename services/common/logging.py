"""Logging set-up for every service: plain or JSON lines, secrets redacted, one line a record.

Also where the libraries' misleading messages are filtered (`quiet_library_noise`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import warnings
from datetime import UTC, datetime
from typing import Any, TextIO

from services.common.names import escape_control

__all__ = [
    "FreshHeadLoadReportFilter",
    "JsonFormatter",
    "MessageFilter",
    "PlainFormatter",
    "SecretRedactingFilter",
    "configure_logging",
    "quiet_library_noise",
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


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (for messages that leave the
    process: a job's failure reason, a status message)."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    return _redact(text, secrets)


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
    quiet_library_noise()


# ---- the libraries' noise -----------------------------------------------------------------
#
# Each filter drops one message of one library that tells a loratune user something false
# or nothing they can act on; every other record of the same logger passes. They sit on the
# emitting logger (not on a handler): transformers logs through a handler of its own that
# does not propagate to ours, and bitsandbytes warns at import, before any handler is set.


class MessageFilter(logging.Filter):
    """Drops a logger's records whose message matches `pattern`; keeps every other record."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a matching message."""
        return not self.pattern.search(record.getMessage())


# The classification heads the trainer fits (the linear probe) or an adapter supplies
# (its saved `modules_to_save`); services/trainer/core/targets.py HEAD_NAMES.
_HEAD_KEY = re.compile(r"^(score|classifier)\.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FreshHeadLoadReportFilter(logging.Filter):
    """Drops transformers' LOAD REPORT when all it reports is a missing classification head.

    `AutoModelForSequenceClassification.from_pretrained` on an encoder checkpoint reports its
    new `classifier.*` / `score.*` weights as MISSING and advises training them; loratune
    does just that (or loads the adapter's trained head over them), so the advice misleads.
    A report with anything else in it (a missing encoder weight, an unexpected or mismatched
    key, a conversion error) still passes, whole.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a report whose every row is a MISSING head weight."""
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [
            [cell.strip() for cell in line.split("|")]
            for line in _ANSI.sub("", message).splitlines()
            if "|" in line
        ]
        entries = [row[:2] for row in rows[1:] if len(row) >= 2]  # rows[0]: the header
        if not entries:
            return True
        return not all(
            status == "MISSING" and _HEAD_KEY.match(key) is not None for key, status in entries
        )


# (logger, filter): what each drops and why.
_LIBRARY_FILTERS: tuple[tuple[str, logging.Filter], ...] = (
    # bitsandbytes, at import on a CPU with AVX512-BF16: an optional kernel for 4-bit layers
    # whose weights were repacked for bfloat16. The trainer never lets a layer repack
    # (services/trainer/core/quantized.py), so no job, 4-bit or not, would use it.
    (
        "bitsandbytes.backends.cpu.ops",
        MessageFilter(r"^Failed to load CPU gemm_4bit_forward from kernels-community\b"),
    ),
    ("transformers.modeling_utils", FreshHeadLoadReportFilter()),
)


def quiet_library_noise() -> None:
    """Install the library message filters; calling it again adds nothing.

    `configure_logging` calls it, and the CLI before any command runs. Logging filters on
    the exact loggers (see `_LIBRARY_FILTERS`), and one warning: PEFT reads transformers'
    deprecated `is_gradient_checkpointing` property when it wraps a model, and transformers
    warns the user of PEFT about it (FutureWarning), which is nothing a loratune user can do.
    """
    for name, noise_filter in _LIBRARY_FILTERS:
        logging.getLogger(name).addFilter(noise_filter)  # the same filter is not added twice
    # An identical filter replaces the earlier one rather than adding a second.
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
