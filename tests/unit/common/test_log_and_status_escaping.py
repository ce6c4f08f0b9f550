"""Log records and status details that carry request text: one line, escaped, bounded."""

from __future__ import annotations

import json
import logging
import sys
import unicodedata

from services.common.interceptors import (
    MAX_STATUS_DETAILS_BYTES,
    MAX_STATUS_DETAILS_CHARS,
    status_details,
)
from services.common.logging import JsonFormatter, PlainFormatter

FORGED = "\n2026-01-01 INFO forged"


def raw_controls(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def record(*args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("from our code")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "loratune.test", logging.INFO, __file__, 1, "unknown id %r, %s, %s", args, exc_info
    )


def test_plain_lines_escape_the_message_so_a_record_is_one_line() -> None:
    line = PlainFormatter().format(record(FORGED, "\x1b[31m", "\x00"))
    assert len(line.splitlines()) == 1
    assert not raw_controls(line)
    assert "'\\n2026-01-01 INFO forged'" in line
    assert line.endswith(", \\x1b[31m, \\x00")
    assert " INFO loratune.test: unknown id " in line


def test_plain_keeps_tracebacks_on_their_own_lines() -> None:
    text = PlainFormatter().format(record(FORGED, "\x1b[31m", "\x00", exc=True))
    first, *rest = text.splitlines()
    assert "forged" in first and not raw_controls(first)
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: from our code"


def test_json_lines_escape_the_message_and_string_extras() -> None:
    rec = record(FORGED, "\x1b[31m", "\x00\x9b\u2028")
    rec.study_name = "s\x1b]0;title\x07"
    line = JsonFormatter().format(rec)
    assert len(line.splitlines()) == 1
    assert not raw_controls(line)
    payload = json.loads(line)
    assert payload["message"] == (
        "unknown id '\\n2026-01-01 INFO forged', \\x1b[31m, \\x00\\x9b\\u2028"
    )
    assert payload["study_name"] == "s\\x1b]0;title\\x07"


def test_json_keeps_the_traceback_whole() -> None:
    payload = json.loads(JsonFormatter().format(record("a", "b", "c", exc=True)))
    assert payload["exc_info"].startswith("Traceback (most recent call last):\n")


def test_unicode_text_is_kept_as_it_is() -> None:
    line = PlainFormatter().format(record("Оплата аренды", "日本", "€"))
    assert "'Оплата аренды', 日本, €" in line


def test_status_details_are_escaped() -> None:
    assert status_details("job_id: got 'a\nb\x1b'") == "job_id: got 'a\\nb\\x1b'"
    assert status_details("LLM Judge model not found: 'x'") == "LLM Judge model not found: 'x'"


def test_status_details_are_bounded_with_a_marker() -> None:
    details = status_details("judge_model_id: " + "x" * 20_000)
    assert len(details) <= MAX_STATUS_DETAILS_CHARS
    assert details.startswith("judge_model_id: xxx")
    assert details.endswith("... [cut, 20016 chars in all]")
    # Four-byte characters: the byte bound cuts, never inside a character.
    emoji = status_details("😀" * 1000)
    assert len(emoji.encode("utf-8")) <= MAX_STATUS_DETAILS_BYTES
    assert emoji.endswith("... [cut, 1000 chars in all]")
    assert set(emoji.removesuffix("... [cut, 1000 chars in all]")) == {"😀"}
    # Escapes count: 400 NULs are 1,600 characters once escaped.
    nuls = status_details("\x00" * 400)
    assert len(nuls) <= MAX_STATUS_DETAILS_CHARS and nuls.startswith("\\x00\\x00")
