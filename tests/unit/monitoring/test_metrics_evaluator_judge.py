"""The evaluator's latency per task, and the judge gateway's series of every registered model."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.evaluator.core.models import EvaluationInput, TaskType
from services.judge_gateway.core.gateway import Item, Outcome
from services.judge_gateway.core.providers.base import ProviderErrorKind
from tests.unit.evaluator.test_evaluation import make as make_evaluator
from tests.unit.judge_gateway.test_gateway_core import by_candidate, ok
from tests.unit.judge_gateway.test_gateway_core import make as make_gateway


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_evaluation_latency_exists_for_both_tasks_from_the_start() -> None:
    for task in ("classification", "generation"):
        assert value("loratune_evaluator_evaluation_seconds_count", task=task) is not None
        assert value("loratune_evaluator_evaluations_total", task_type=task) is not None


async def test_an_evaluation_is_timed_under_its_task() -> None:
    name = "loratune_evaluator_evaluation_seconds_count"
    before = value(name, task="classification") or 0.0
    generation = value(name, task="generation") or 0.0
    await make_evaluator().evaluate(
        EvaluationInput(task=TaskType.CLASSIFICATION, predictions=["x", "y"], references=["x", "x"])
    )
    assert (value(name, task="classification") or 0.0) - before == 1
    assert value(name, task="generation") == generation
    assert (value("loratune_evaluator_evaluation_seconds_sum", task="classification") or 0) > 0


async def test_judge_series_exist_for_every_model_and_count_coverage() -> None:
    gateway, provider = make_gateway()
    for model in ("gemini", "gigachat"):
        assert value("loratune_judge_circuit_open", judge_model_id=model) == 0
        for outcome in Outcome:
            labels = {"judge_model_id": model, "outcome": outcome.value}
            assert value("loratune_judge_requests_total", **labels) is not None
        for kind in ("input", "output"):
            assert value("loratune_judge_tokens_total", judge_model_id=model, type=kind) is not None
        for error in ProviderErrorKind:
            if error.retryable:
                labels = {"judge_model_id": model, "reason": error.value}
                assert value("loratune_judge_retries_total", **labels) is not None

    def count(outcome: str) -> float:
        return value("loratune_judge_requests_total", judge_model_id="gemini", outcome=outcome) or 0

    ok_before, failed_before = count("ok"), count("parse_failed")
    misses = value("loratune_judge_cache_misses_total") or 0.0
    provider.default = by_candidate({"c0": ok(90), "c1": ok(text="garbage")})
    await gateway.score("gemini", [Item("p", "c0", "r"), Item("p", "c1", "r")])
    # Coverage (judged / asked) is ok / all outcomes in PromQL.
    assert count("ok") - ok_before == 1
    assert count("parse_failed") - failed_before == 1
    assert (value("loratune_judge_cache_misses_total") or 0) - misses == 2
