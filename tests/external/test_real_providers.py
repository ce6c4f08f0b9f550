"""Against the real Gemini and GigaChat APIs: run by hand with credentials, never in CI."""

from __future__ import annotations

import os

import pytest

from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.core.gateway import Item
from services.judge_gateway.main import build_gateway

pytestmark = pytest.mark.external

ITEM = Item(
    prompt="How long does a card delivery take?",
    candidate="Your card arrives within a week.",
    reference="Cards are delivered in 5-7 working days.",
)


@pytest.mark.parametrize(
    ("model_id", "variable"), [("gemini", "GEMINI_API_KEY"), ("gigachat", "GIGACHAT_CREDENTIALS")]
)
async def test_real_provider_judges_one_item(model_id: str, variable: str) -> None:
    if not os.environ.get(variable):
        pytest.skip(f"{variable} is not set")
    gateway = build_gateway(JudgeSettings())
    try:
        batch = await gateway.score(model_id, [ITEM])
    finally:
        await gateway.aclose()
    assert batch.judged == 1
    score = batch.results[0].score
    assert score is not None and 50 <= score <= 100
