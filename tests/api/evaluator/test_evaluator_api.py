"""EvaluatorService over a real socket, with the real interceptors and a fake judge gateway."""

from __future__ import annotations

import re
from typing import Any

import bert_score
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from services.evaluator.core.bertscore import packaged_minilm_path

EvaluatorHarness = Any

CLS = common_pb2.TASK_TYPE_CLASSIFICATION
GEN = common_pb2.TASK_TYPE_GENERATION

PREDICTIONS = [
    "The card was blocked after three wrong PIN attempts.",
    "Оплата по счёту 42 за аренду офиса",
    "You can top up with a bank transfer.",
    "",
    "Refunds take five to seven working days.",
    "I don't know.",
]
REFERENCES = [
    "Your card is blocked because the PIN was entered wrongly three times.",
    "Оплата аренды офиса по счёту № 42",
    "Top-ups by bank transfer are supported.",
    "Contact support to change your address.",
    "A refund usually takes 5-7 working days.",
    "The exchange rate is updated every minute.",
]


def scrape(harness: EvaluatorHarness) -> str:
    return httpx.get(f"http://127.0.0.1:{harness.server.metrics_port}/metrics").text


def sample_value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_health_serving(evaluator: EvaluatorHarness) -> None:
    stub = health_pb2_grpc.HealthStub(evaluator.channel)
    for service in ("", "loratune.evaluator.v1.EvaluatorService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_classification_over_grpc(evaluator: EvaluatorHarness) -> None:
    response = await evaluator.stub.Evaluate(
        evaluator_pb2.EvaluateRequest(
            task_type=CLS,
            predictions=["62", "62", "68", "51", "62"],
            references=["62", "68", "68", "51", "51"],
            labels=["51", "62", "68", "90"],
        )
    )
    result = response.result
    cls = result.classification
    assert result.objective_name == "f1_macro" and result.objective == pytest.approx(cls.f1_macro)
    assert cls.accuracy == pytest.approx(0.6)
    assert [c.label for c in cls.per_class] == ["51", "62", "68", "90"]
    assert {c.label: c.support for c in cls.per_class} == {"51": 2, "62": 1, "68": 2, "90": 0}
    assert list(cls.confusion_matrix.labels) == ["51", "62", "68", "90"]
    assert len(cls.confusion_matrix.counts) == 16
    assert sum(cls.confusion_matrix.counts) == 5
    assert cls.worst_classes[0] in {"51", "62", "68"}


async def test_generation_equals_bert_score_and_counts_empties(evaluator: EvaluatorHarness) -> None:
    before = scrape(evaluator)
    request = evaluator_pb2.EvaluateRequest(
        task_type=GEN, predictions=PREDICTIONS, references=REFERENCES
    )
    first = (await evaluator.stub.Evaluate(request)).result
    second = (await evaluator.stub.Evaluate(request)).result
    bert = first.bertscore
    assert first.objective_name == "combined"
    assert first.combined_score == pytest.approx(bert.f1) and not first.HasField("judge")
    assert bert.empty_texts == 1 and bert.pairs == 6 and bert.num_layers == 6
    assert "L6_no-idf" in bert.hash
    # The cache changes nothing in the result.
    assert second.bertscore.f1 == pytest.approx(bert.f1, abs=1e-7)

    non_empty = [i for i, p in enumerate(PREDICTIONS) if p]
    _, _, f1 = bert_score.score(
        [PREDICTIONS[i] for i in non_empty],
        [REFERENCES[i] for i in non_empty],
        model_type=packaged_minilm_path(),
        num_layers=6,
    )
    # Empty pairs score 0 and count in the mean.
    assert bert.f1 == pytest.approx(float(f1.sum()) / len(PREDICTIONS), abs=1e-4)

    after = scrape(evaluator)
    name = "loratune_evaluator_evaluations_total"
    assert (
        sample_value(after, name, '{task_type="generation"}')
        - sample_value(before, name, '{task_type="generation"}')
        == 2
    )
    for metric, delta in (
        ("loratune_evaluator_bertscore_pairs_total", 12),
        ("loratune_evaluator_empty_texts_total", 2),
    ):
        assert sample_value(after, metric) - sample_value(before, metric) == delta, metric
    hits = "loratune_evaluator_reference_cache_hits_total"
    assert sample_value(after, hits) - sample_value(before, hits) >= len(non_empty)
    assert "loratune_evaluator_bertscore_seconds_count" in after
    assert "loratune_evaluator_truncated_texts_total" in after
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="Evaluate"' in after


async def test_judge_combined_score(evaluator: EvaluatorHarness) -> None:
    evaluator.judge.scores = {p: 50.0 + 10 * i for i, p in enumerate(PREDICTIONS)}
    request = evaluator_pb2.EvaluateRequest(
        task_type=GEN,
        predictions=PREDICTIONS,
        references=REFERENCES,
        prompts=[f"question {i}" for i in range(6)],
        judge=evaluator_pb2.JudgeOptions(enabled=True, judge_model_id="gemini", seed=5),
    )
    result = (await evaluator.stub.Evaluate(request)).result
    judge = result.judge
    assert judge.requested == 5 and judge.judged == 5 and judge.coverage == 1.0
    picked = list(judge.sample_indices)
    expected_mean = sum(50.0 + 10 * i for i in picked) / 5
    assert judge.mean_score == pytest.approx(expected_mean)
    assert judge.provider_model == "gemini-fake-001"
    assert result.combined_score == pytest.approx(
        0.4 * result.bertscore.f1 + 0.6 * expected_mean / 100
    )
    sent = evaluator.judge.requests[-1]
    assert [i.prompt for i in sent.items] == [f"question {i}" for i in picked]
    # The same seed picks the same items next time.
    again = (await evaluator.stub.Evaluate(request)).result
    assert list(again.judge.sample_indices) == picked


async def test_unknown_judge_is_not_found_with_the_gateway_message(
    evaluator: EvaluatorHarness,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluator.stub.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=GEN,
                predictions=PREDICTIONS,
                references=REFERENCES,
                judge=evaluator_pb2.JudgeOptions(enabled=True, judge_model_id="nope"),
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details().startswith("LLM Judge model not found: 'nope'")


async def test_low_judge_coverage_is_unavailable(evaluator: EvaluatorHarness) -> None:
    evaluator.judge.default_score = None  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluator.stub.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=GEN,
                predictions=PREDICTIONS,
                references=REFERENCES,
                judge=evaluator_pb2.JudgeOptions(enabled=True, sample_size=3),
            )
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "coverage 0.00" in caught.value.details()


async def test_gateway_down_is_unavailable(evaluator: EvaluatorHarness) -> None:
    evaluator.judge.fail_with = (grpc.StatusCode.UNAVAILABLE, "provider down")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluator.stub.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=GEN,
                predictions=["a"],
                references=["b"],
                judge=evaluator_pb2.JudgeOptions(enabled=True),
            )
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "judge gateway: provider down" in caught.value.details()


def _bad_requests() -> list[tuple[evaluator_pb2.EvaluateRequest, str]]:
    ok = dict(predictions=["a", "b"], references=["a", "c"])
    return [
        (
            evaluator_pb2.EvaluateRequest(task_type=CLS, predictions=["a"], references=["a", "b"]),
            "references",
        ),
        (evaluator_pb2.EvaluateRequest(task_type=CLS), "predictions"),
        (evaluator_pb2.EvaluateRequest(**ok), "task_type"),
        (
            evaluator_pb2.EvaluateRequest(
                task_type=GEN, weights=evaluator_pb2.ScoreWeights(bertscore=0.5, judge=0.6), **ok
            ),
            "weights",
        ),
        (
            evaluator_pb2.EvaluateRequest(
                task_type=GEN, weights=evaluator_pb2.ScoreWeights(bertscore=-1, judge=2), **ok
            ),
            "weights.bertscore",
        ),
        (
            evaluator_pb2.EvaluateRequest(
                task_type=GEN, judge=evaluator_pb2.JudgeOptions(enabled=True, sample_size=0), **ok
            ),
            "judge.sample_size",
        ),
    ]


@pytest.mark.parametrize(("request_", "field"), _bad_requests())
async def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    evaluator: EvaluatorHarness, request_: evaluator_pb2.EvaluateRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluator.stub.Evaluate(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    ok = await evaluator.stub.Evaluate(
        evaluator_pb2.EvaluateRequest(task_type=CLS, predictions=["a"], references=["a"])
    )
    assert ok.result.classification.accuracy == 1.0


async def test_message_over_the_size_limit_is_refused(evaluator: EvaluatorHarness) -> None:
    huge = "x" * (3 * 2**20)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await evaluator.stub.Evaluate(
            evaluator_pb2.EvaluateRequest(task_type=GEN, predictions=[huge], references=["y"])
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = await evaluator.stub.Evaluate(
        evaluator_pb2.EvaluateRequest(task_type=CLS, predictions=["a"], references=["a"])
    )
    assert ok.result.objective == 1.0
