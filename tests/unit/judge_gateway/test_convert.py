"""The gateway's edge: a ScoreResponsesRequest becomes domain values, or names the bad field."""

from __future__ import annotations

import pytest

from loratune.judge.v1 import judge_pb2
from services.common import errors
from services.judge_gateway.api.convert import (
    MAX_ITEMS,
    MAX_JUDGE_MODEL_ID_LENGTH,
    MAX_RUBRIC_CHARS,
    MAX_TEXT_CHARS,
    score_call_from_proto,
)
from services.judge_gateway.core.gateway import Item


def request(**fields: object) -> judge_pb2.ScoreResponsesRequest:
    base: dict[str, object] = {
        "judge_model_id": "gemini",
        "items": [judge_pb2.JudgeItem(prompt="p", candidate="c", reference="r")],
    }
    return judge_pb2.ScoreResponsesRequest(**{**base, **fields})


def test_a_request_within_the_bounds_converts_whole() -> None:
    call = score_call_from_proto(
        request(
            judge_model_id="m" * MAX_JUDGE_MODEL_ID_LENGTH,
            rubric="r" * MAX_RUBRIC_CHARS,
            items=[judge_pb2.JudgeItem(prompt="p" * MAX_TEXT_CHARS, candidate="", reference="r")]
            * 2,
        )
    )
    assert call.judge_model_id == "m" * MAX_JUDGE_MODEL_ID_LENGTH
    assert call.items == (Item("p" * MAX_TEXT_CHARS, "", "r"),) * 2
    assert len(call.rubric) == MAX_RUBRIC_CHARS


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"judge_model_id": "x" * (MAX_JUDGE_MODEL_ID_LENGTH + 1)}, "judge_model_id"),
        ({"judge_model_id": "x" * 20_000}, "judge_model_id"),
        ({"rubric": "r" * (MAX_RUBRIC_CHARS + 1)}, "rubric"),
        ({"items": [judge_pb2.JudgeItem(candidate="c")] * (MAX_ITEMS + 1)}, "items"),
        (
            {
                "items": [
                    judge_pb2.JudgeItem(candidate="c"),
                    judge_pb2.JudgeItem(candidate="c" * (MAX_TEXT_CHARS + 1)),
                ]
            },
            "items[1].candidate",
        ),
        ({"items": [judge_pb2.JudgeItem(prompt="p" * (MAX_TEXT_CHARS + 1))]}, "items[0].prompt"),
        (
            {"items": [judge_pb2.JudgeItem(reference="r" * (MAX_TEXT_CHARS + 1))]},
            "items[0].reference",
        ),
    ],
)
def test_beyond_a_bound_is_invalid_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        score_call_from_proto(request(**fields))
    assert caught.value.field == field
    assert len(str(caught.value)) < 200
