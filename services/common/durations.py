"""Durations as people write them: `90m`, `1h30m`, `2h`, `45s`, `1d`, or plain seconds."""

from __future__ import annotations

import re

__all__ = ["MAX_DURATION_SECONDS", "format_duration", "parse_duration"]

# 30 days: the longest time budget a study may have.
MAX_DURATION_SECONDS = 30 * 24 * 3600
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([dhms])")
_WHOLE = re.compile(r"(?:\d+[dhms])+")


def parse_duration(text: str | int) -> int:
    """Seconds of `text`: an integer of seconds, or parts like `1h30m` (d, h, m, s, each
    once at most, largest first). ValueError, saying what is accepted, otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"must be a duration such as 90m, 2h or 1h30m, got {text!r}")
    if isinstance(text, int):
        seconds = text
    else:
        shown = text if len(text) <= 40 else text[:40] + "..."
        value = text.strip().lower()
        if value.isdigit():
            seconds = int(value)
        elif _WHOLE.fullmatch(value):
            parts = _PART.findall(value)
            units = [unit for _, unit in parts]
            order = list(_UNITS)
            if len(set(units)) != len(units) or units != sorted(units, key=order.index):
                raise ValueError(
                    f"must give each unit once, largest first (d h m s), got {shown!r}"
                )
            seconds = sum(int(n) * _UNITS[unit] for n, unit in parts)
        else:
            raise ValueError(f"must be a duration such as 90m, 2h or 1h30m, got {shown!r}")
    if not 0 <= seconds <= MAX_DURATION_SECONDS:
        raise ValueError(f"must be between 0 and 30 days, got {seconds} s")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h30m`, `45m`, `20s`: whole units, largest first (for people, not parsing back)."""
    left = max(0, round(seconds))
    if left == 0:
        return "0s"
    out = []
    for unit, size in _UNITS.items():
        if left >= size:
            out.append(f"{left // size}{unit}")
            left %= size
    return "".join(out)
