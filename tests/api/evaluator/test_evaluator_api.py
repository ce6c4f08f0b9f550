"""EvaluatorService over a real socket, with the real interceptors and a fake judge gateway."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import bert_score
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.config import CommonSettings
from services.common.server import start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.main import build_evaluator, service_definition

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
        (  # bert-score ships no baseline for a local model folder
            evaluator_pb2.EvaluateRequest(
                task_type=GEN, bertscore_rescale=evaluator_pb2.BERTSCORE_RESCALE_PACKAGED, **ok
            ),
            "bertscore_rescale",
        ),
        (
            evaluator_pb2.EvaluateRequest(
                task_type=GEN,
                predictions=["a", "b"],
                references=["same", "same"],
                bertscore_rescale=evaluator_pb2.BERTSCORE_RESCALE_REFERENCES,
            ),
            "bertscore_rescale",
        ),
        (
            evaluator_pb2.EvaluateRequest(
                task_type=GEN,
                bertscore_rescale=9,  # type: ignore[arg-type]
                **ok,
            ),
            "bertscore_rescale",
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


async def test_references_rescaling_round_trip(evaluator: EvaluatorHarness) -> None:
    before = scrape(evaluator)
    predictions = [p or "no answer" for p in PREDICTIONS]  # no empty pair: means stay affine
    raw_request = evaluator_pb2.EvaluateRequest(
        task_type=GEN, predictions=predictions, references=REFERENCES
    )
    raw = await evaluator.stub.Evaluate(raw_request)
    rescaled_request = evaluator_pb2.EvaluateRequest(
        task_type=GEN,
        predictions=predictions,
        references=REFERENCES,
        bertscore_rescale=evaluator_pb2.BERTSCORE_RESCALE_REFERENCES,
    )
    first = await evaluator.stub.Evaluate(rescaled_request)
    later = evaluator_pb2.EvaluateRequest()
    later.CopyFrom(rescaled_request)
    later.predictions[:] = REFERENCES  # another trial, the same references
    second = await evaluator.stub.Evaluate(later)

    assert raw.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_NONE
    assert raw.result.bertscore.baseline_f1 == 0.0
    assert raw.result.bertscore.raw_f1 == raw.result.bertscore.f1
    assert not raw.result.bertscore.rescaled_with_baseline

    bert = first.result.bertscore
    b = bert.baseline_f1
    assert first.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_REFERENCES
    assert 0 < b < 1
    assert bert.raw_f1 == pytest.approx(raw.result.bertscore.f1, abs=1e-6)
    assert bert.f1 == pytest.approx((bert.raw_f1 - b) / (1 - b), abs=1e-6)
    assert first.result.combined_score == pytest.approx(bert.f1)
    assert bert.rescaled_with_baseline
    digest = hashlib.sha256()
    for ref in REFERENCES:
        digest.update(len(ref.encode()).to_bytes(8, "big") + ref.encode())
    assert bert.hash == f"{raw.result.bertscore.hash}-rescaled-refs:{digest.hexdigest()[:12]}"
    # The baseline belongs to the references, not to a trial's predictions.
    assert second.result.bertscore.baseline_f1 == b
    assert second.result.bertscore.hash == bert.hash
    assert second.result.bertscore.f1 == pytest.approx(1.0, abs=1e-5)
    # Rescaling stretches differences between trials by 1 / (1 - b).
    raw_spread = second.result.bertscore.raw_f1 - bert.raw_f1
    assert second.result.bertscore.f1 - bert.f1 == pytest.approx(raw_spread / (1 - b), rel=1e-4)

    after = scrape(evaluator)
    name = "loratune_evaluator_bertscore_rescale_total"
    for label, delta in (("references", 2), ("none", 1)):
        labels = f'{{rescale="{label}"}}'
        assert sample_value(after, name, labels) - sample_value(before, name, labels) == delta
    baseline_count = "loratune_evaluator_reference_baseline_seconds_count"
    assert sample_value(after, baseline_count) - sample_value(before, baseline_count) == 1


async def test_reasoning_blocks_are_stripped_and_counted(evaluator: EvaluatorHarness) -> None:
    evaluator.judge.scores = {REFERENCES[0]: 100.0, f"<think>hm</think>{REFERENCES[0]}": 0.0}
    response = await evaluator.stub.Evaluate(
        evaluator_pb2.EvaluateRequest(
            task_type=GEN,
            predictions=[f"<think>hm</think>{REFERENCES[0]}", REFERENCES[1]],
            references=REFERENCES[:2],
            judge=evaluator_pb2.JudgeOptions(enabled=True, sample_size=2),
        )
    )
    assert response.reasoning_stripped == 1
    assert response.result.bertscore.f1 == pytest.approx(1.0, abs=1e-5)
    assert [i.candidate for i in evaluator.judge.requests[-1].items] == REFERENCES[:2]
    assert response.result.judge.mean_score == pytest.approx((100.0 + 70.0) / 2)


async def test_references_setting_applies_when_the_request_does_not_say() -> None:
    settings = EvaluatorSettings(
        bertscore_model=packaged_minilm_path(), bertscore_layers=6, bertscore_rescale="references"
    )
    server = await start_server(
        [service_definition(build_evaluator(settings))],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            by_setting = await stub.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    task_type=GEN, predictions=PREDICTIONS, references=REFERENCES
                )
            )
            raw = await stub.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    task_type=GEN,
                    predictions=PREDICTIONS,
                    references=REFERENCES,
                    bertscore_rescale=evaluator_pb2.BERTSCORE_RESCALE_NONE,
                )
            )
            # One reference allows no baseline: the setting falls back to raw scores.
            single = await stub.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    task_type=GEN, predictions=["a card"], references=["my card"]
                )
            )
    finally:
        await server.stop(0)
    assert by_setting.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_REFERENCES
    assert "-rescaled-refs:" in by_setting.result.bertscore.hash
    assert by_setting.result.bertscore.raw_f1 == pytest.approx(raw.result.bertscore.f1)
    assert raw.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_NONE
    assert single.bertscore_rescale == evaluator_pb2.BERTSCORE_RESCALE_NONE
    assert "rescaled" not in single.result.bertscore.hash
    assert single.result.bertscore.baseline_f1 == 0.0
