"""The shared helpers: status mapping, Retry-After and duration parsing, redaction."""

from __future__ import annotations

import email.utils

import pytest

from services.judge_gateway.core.providers._common import (
    api_version_from_url,
    kind_for_status,
    parse_duration,
    parse_retry_after,
    redact,
)
from services.judge_gateway.core.providers.base import ProviderErrorKind

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone: not an HTTP date
        ("next week", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7s", 7.0), ("0.250s", 0.25), ("43200s", 43200.0), ("7", None), (7, None), (None, None)],
)
def test_parse_duration(value: object, expected: float | None) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ProviderErrorKind.BAD_REQUEST),
        (401, ProviderErrorKind.UNAUTHENTICATED),
        (403, ProviderErrorKind.PERMISSION_DENIED),
        (404, ProviderErrorKind.MODEL_NOT_FOUND),
        (408, ProviderErrorKind.TIMEOUT),
        (413, ProviderErrorKind.BAD_REQUEST),
        (429, ProviderErrorKind.RATE_LIMITED),
        (500, ProviderErrorKind.SERVER),
        (529, ProviderErrorKind.SERVER),
        (302, ProviderErrorKind.SERVER),
    ],
)
def test_kind_for_status(status: int, kind: ProviderErrorKind) -> None:
    assert kind_for_status(status) is kind


def test_redact_replaces_every_secret_and_bounds_length() -> None:
    text = redact("key=abc123 token=xyz abc123 " + "x" * 1000, ["abc123", None, "", "xyz"])
    assert "abc123" not in text
    assert "xyz" not in text
    assert text.startswith("key=[redacted] token=[redacted] [redacted]")
    assert len(text) < 400


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://gigachat.devices.sberbank.ru/api/v1", "v1"),
        ("http://127.0.0.1:8000/v1/", "v1"),
        ("https://example.test/v1beta", "v1beta"),
        ("http://localhost:11434", "v9"),
    ],
)
def test_api_version_from_url(url: str, expected: str) -> None:
    assert api_version_from_url(url, "v9") == expected
