"""Conversion of the judge gateway's requests to domain values, with the edge's bounds."""

from __future__ import annotations

from dataclasses import dataclass

from loratune.judge.v1 import judge_pb2
from services.common.errors import InvalidArgument
from services.judge_gateway.core.gateway import Item

__all__ = [
    "MAX_ITEMS",
    "MAX_JUDGE_MODEL_ID_LENGTH",
    "MAX_RUBRIC_CHARS",
    "MAX_TEXT_CHARS",
    "ScoreCall",
    "score_call_from_proto",
]

# Registry ids are short names ("gemini", "local-qwen"); a longer one cannot exist.
MAX_JUDGE_MODEL_ID_LENGTH = 128
# One request's items; each is a provider call, so more belongs in several requests.
MAX_ITEMS = 1000
# Per prompt, candidate and reference: ~25k tokens, what the judges' contexts take whole.
MAX_TEXT_CHARS = 100_000
# A rubric is a page of instructions, not a document.
MAX_RUBRIC_CHARS = 20_000


@dataclass(frozen=True)
class ScoreCall:
    """A ScoreResponsesRequest as the core takes it."""

    judge_model_id: str
    items: tuple[Item, ...]
    rubric: str


def _check_length(value: str, limit: int, field: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"must be at most {limit} characters, got {len(value)}", field=field)


def score_call_from_proto(request: judge_pb2.ScoreResponsesRequest) -> ScoreCall:
    """The request's id, items and rubric, each within its bound (INVALID_ARGUMENT if not)."""
    _check_length(request.judge_model_id, MAX_JUDGE_MODEL_ID_LENGTH, "judge_model_id")
    _check_length(request.rubric, MAX_RUBRIC_CHARS, "rubric")
    if len(request.items) > MAX_ITEMS:
        raise InvalidArgument(
            f"must hold at most {MAX_ITEMS} items, got {len(request.items)}; "
            "split them over several requests",
            field="items",
        )
    items = []
    for index, item in enumerate(request.items):
        for name in ("prompt", "candidate", "reference"):
            _check_length(getattr(item, name), MAX_TEXT_CHARS, f"items[{index}].{name}")
        items.append(Item(item.prompt, item.candidate, item.reference))
    return ScoreCall(request.judge_model_id, tuple(items), request.rubric)
