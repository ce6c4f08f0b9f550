"""Durations as people write them (`--time-budget 90m`, a project's `time_budget: 2h`)."""

from __future__ import annotations

import pytest

from services.common.durations import MAX_DURATION_SECONDS, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90m", 5400),
        ("1h30m", 5400),
        ("2h", 7200),
        ("45s", 45),
        ("1d", 86400),
        ("1d2h3m4s", 93784),
        (" 90M ", 5400),
        ("600", 600),
        (600, 600),
        ("0", 0),
        (0, 0),
    ],
)
def test_durations_read_as_written(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("90 minutes", "such as 90m"),
        ("1.5h", "such as 90m"),
        ("-5m", "such as 90m"),
        ("", "such as 90m"),
        ("30m1h", "largest first"),
        ("1h1h", "each unit once"),
        ("31d", "between 0 and 30 days"),
        (MAX_DURATION_SECONDS + 1, "between 0 and 30 days"),
        (True, "such as 90m"),
        ("x" * 5000, "..."),
    ],
)
def test_anything_else_says_what_is_accepted(text: str | int, words: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert words in str(caught.value)
    assert len(str(caught.value)) < 200  # a long input is shown cut, never whole


def test_durations_print_in_whole_units() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(45) == "45s"
    assert format_duration(0) == "0s"
    assert format_duration(86400 + 60) == "1d1m"
