"""Reading a score out of a judge's reply: JSON first, then a documented fallback."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
# Fallback patterns, tried in order on replies that are not JSON:
#   "score": 85   /   Score: 85   /   score = 85.5   /   85/100
_SCORE_FIELD = re.compile(r"\"?score\"?\s*[:=]\s*\"?(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_OUT_OF_100 = re.compile(r"(-?\d+(?:\.\d+)?)\s*/\s*100\b")


@dataclass(frozen=True)
class Judgment:
    """A valid judgment: a score in 0..100 and the judge's reasoning."""

    score: float
    reasoning: str


def _clamp(value: float) -> float:
    return min(100.0, max(0.0, value))


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _from_json(text: str) -> Judgment | None:
    candidates = [text]
    match = _OBJECT.search(text)
    if match and match.group(0) != text:
        candidates.append(match.group(0))
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            score = _number(data.get("score"))
            if score is not None:
                reasoning = data.get("reasoning", "")
                return Judgment(_clamp(score), reasoning if isinstance(reasoning, str) else "")
    return None


def parse_judgment(text: str) -> Judgment | None:
    """The judgment in `text`, or None when no score can be read (never a made-up 0).

    1. JSON: the reply (code fences stripped), or the outermost {...} inside it, with a
       numeric `score` (a number or a numeric string) and an optional `reasoning`.
    2. Fallback, for judges that ignore the schema: the last `score: N` / `score = N`,
       else the last `N/100`; the reasoning is then the whole reply.
    Scores are clamped to 0..100.
    """
    stripped = _FENCE.sub("", text.strip()).strip()
    if not stripped:
        return None
    judgment = _from_json(stripped)
    if judgment is not None:
        return judgment
    for pattern in (_SCORE_FIELD, _OUT_OF_100):
        matches = pattern.findall(stripped)
        if matches:
            score = _number(matches[-1])
            if score is not None:
                return Judgment(_clamp(score), stripped)
    return None
