"""Reasoning blocks in generated text: what a model thought is not what it answered.

Qwen3-style chat templates let a model open a ``<think> ... </think>`` block before its
answer (DeepSeek-R1 and others use the same tags). The trainer generates with thinking
off where the template supports it, and predictions are scored without any reasoning
block, so a trial is never rewarded or punished for the reasoning it printed.
"""

from __future__ import annotations

import re

__all__ = ["REASONING_TAGS", "strip_reasoning"]

REASONING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"))
"""The (open, close) tag pairs recognised, matched case-insensitively."""

_BLOCKS = [
    re.compile(re.escape(open_) + r".*?" + re.escape(close), re.IGNORECASE | re.DOTALL)
    for open_, close in REASONING_TAGS
]
_UNCLOSED = [
    re.compile(re.escape(open_) + r".*\Z", re.IGNORECASE | re.DOTALL) for open_, _ in REASONING_TAGS
]
_STRAY_CLOSE = [
    re.compile(r"\A.*?" + re.escape(close), re.IGNORECASE | re.DOTALL)
    for _, close in REASONING_TAGS
]


def strip_reasoning(text: str) -> str:
    """``text`` without reasoning blocks, stripped of surrounding whitespace.

    - every closed block (``<think>...</think>``) is removed, wherever it is;
    - a block opened and never closed (generation stopped at ``max_new_tokens`` while the
      model was still thinking) is removed to the end: there is no answer after it;
    - a closing tag with no opening one (the template put ``<think>`` in the prompt, so
      only the rest was generated) removes everything up to and including it.
    """
    if "<" not in text:
        return text.strip()
    for pattern in _BLOCKS:
        text = pattern.sub("", text)
    for pattern in _UNCLOSED:
        text = pattern.sub("", text)
    for pattern in _STRAY_CLOSE:
        text = pattern.sub("", text, count=1)
    return text.strip()
