"""Reasoning blocks are stripped from predictions before they are scored."""

from __future__ import annotations

import pytest

from services.common.reasoning import strip_reasoning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card arrival", "card arrival"),
        ("  card arrival \n", "card arrival"),
        ("<think>\nthe user asks where the card is\n</think>\n\ncard arrival", "card arrival"),
        ("<think>\n\n</think>\n\ncard arrival", "card arrival"),
        ("<THINK>upper case</THINK> card arrival", "card arrival"),
        ("<thinking>other tag</thinking>card arrival", "card arrival"),
        ("<think>a</think> card <think>b</think>arrival", "card arrival"),
        # generation stopped while thinking: there is no answer
        ("<think>still thinking about the card", ""),
        # the template opened the block in the prompt: only its end was generated
        ("the user wants the card</think>\n\ncard arrival", "card arrival"),
        # angle brackets that are not reasoning tags stay
        ("a <b> c", "a <b> c"),
    ],
)
def test_strip_reasoning(text: str, expected: str) -> None:
    assert strip_reasoning(text) == expected
