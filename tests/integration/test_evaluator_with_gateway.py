"""The judge path end to end: evaluator -> real judge gateway -> fake Gemini (real SDK)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.server import start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.main import build_evaluator
from services.evaluator.main import service_definition as evaluator_definition
from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.main import build_gateway
from services.judge_gateway.main import service_definition as judge_definition
from tests.fakes.gemini import FakeGemini
from tests.fakes.http import Reply

KEY = "AIzaSy-integration-secret"
PREDICTIONS = [f"Your card will arrive in {d} days." for d in range(3, 11)]
REFERENCES = ["Cards arrive within 7 working days."] * 8


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=KEY) as fake:
        yield fake


@pytest.fixture
async def stack(gemini: FakeGemini) -> AsyncIterator[evaluator_pb2_grpc.EvaluatorServiceStub]:
    """Gateway and evaluator, each its own server on loopback, as in a deployment."""
    gateway = build_gateway(
        JudgeSettings(retry_base_delay_seconds=0.05),
        {"GEMINI_API_KEY": KEY, "GOOGLE_GEMINI_BASE_URL": gemini.url},
    )
    judge_server = await start_server(
        [judge_definition(gateway)], CommonSettings(), host="127.0.0.1", metrics_port=None
    )
    evaluator = build_evaluator(
        EvaluatorSettings(
            bertscore_model=packaged_minilm_path(),
            bertscore_layers=6,
            judge_address=judge_server.address,
        ),
        ClientSettings(),
    )
    evaluator_server = await start_server(
        [evaluator_definition(evaluator)], CommonSettings(), host="127.0.0.1", metrics_port=None
    )
    async with grpc.aio.insecure_channel(evaluator_server.address) as channel:
        yield evaluator_pb2_grpc.EvaluatorServiceStub(channel)
    await evaluator_server.stop(0)
    await judge_server.stop(0)


def by_candidate(request: Any) -> Reply:
    """The fake judge gives each candidate a score from its number of days."""
    text = request.body["contents"][0]["parts"][0]["text"]
    days = int(text.split("<<<BEGIN CANDIDATE>>>\n")[1].split("arrive in ")[1].split(" ")[0])
    return Reply.json_text(json.dumps({"reasoning": "checked", "score": 100 - 5 * abs(days - 7)}))


async def test_combined_score_through_the_real_gateway(
    stack: evaluator_pb2_grpc.EvaluatorServiceStub, gemini: FakeGemini
) -> None:
    gemini.responder = by_candidate
    request = evaluator_pb2.EvaluateRequest(
        task_type=common_pb2.TASK_TYPE_GENERATION,
        predictions=PREDICTIONS,
        references=REFERENCES,
        prompts=["When will my card arrive?"] * 8,
        judge=evaluator_pb2.JudgeOptions(enabled=True, judge_model_id="gemini", seed=3),
    )
    result = (await stack.Evaluate(request)).result
    picked = list(result.judge.sample_indices)
    expected_scores = [100 - 5 * abs((3 + i) - 7) for i in picked]
    mean = sum(expected_scores) / len(expected_scores)
    assert result.judge.judged == 5 and result.judge.requested == 5
    assert result.judge.mean_score == pytest.approx(mean, abs=1e-9)
    assert result.combined_score == pytest.approx(
        0.4 * result.bertscore.f1 + 0.6 * mean / 100, abs=1e-12
    )
    assert result.objective == result.combined_score
    assert len(gemini.requests) == 5
    # A second trial with the same outputs is judged from the gateway's cache.
    again = (await stack.Evaluate(request)).result
    assert again.combined_score == pytest.approx(result.combined_score, abs=1e-9)
    assert len(gemini.requests) == 5


async def test_unknown_judge_reaches_the_caller(
    stack: evaluator_pb2_grpc.EvaluatorServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=common_pb2.TASK_TYPE_GENERATION,
                predictions=["a"],
                references=["b"],
                judge=evaluator_pb2.JudgeOptions(enabled=True, judge_model_id="gpt-judge"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == (
        "LLM Judge model not found: 'gpt-judge' (available: gemini, gigachat)"
    )


async def test_missing_credentials_is_failed_precondition(
    stack: evaluator_pb2_grpc.EvaluatorServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=common_pb2.TASK_TYPE_GENERATION,
                predictions=["a"],
                references=["b"],
                judge=evaluator_pb2.JudgeOptions(enabled=True, judge_model_id="gigachat"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "GIGACHAT_CREDENTIALS" in caught.value.details()
