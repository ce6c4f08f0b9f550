"""The evaluator core with a fake BERTScore engine and a fake judge: validation and combining."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.evaluator.core.bertscore import BertScoreResult
from services.evaluator.core.evaluation import Evaluator, EvaluatorOptions, judge_sample
from services.evaluator.core.models import (
    EvaluationInput,
    JudgeBatch,
    JudgeItem,
    JudgeOptions,
    TaskType,
    Weights,
)
from services.evaluator.core.rescaling import Baseline, RescaleMode
from services.evaluator.metrics import EvaluatorMetrics

PACKAGED = Baseline(RescaleMode.PACKAGED, 0.5, 0.5, 0.5, tag="rescaled")


class OverlapScorer:
    """A stand-in BERTScore: token-set overlap, deterministic and cheap; records its calls."""

    hash = "overlap_L1_no-idf"

    def __init__(self, packaged: Baseline | None = PACKAGED) -> None:
        self.packaged = packaged
        self.calls: list[tuple[list[str], list[str], Baseline | None]] = []

    def packaged_baseline(self) -> Baseline:
        if self.packaged is None:
            raise ValueError("bert-score ships no baseline for the local model folder 'overlap'")
        return self.packaged

    def score(
        self,
        candidates: Sequence[str],
        references: Sequence[str],
        baseline: Baseline | None = None,
        *,
        idf_references: Sequence[str] | None = None,
    ) -> BertScoreResult:
        self.calls.append((list(candidates), list(references), baseline))
        raw = []
        for c, r in zip(candidates, references, strict=True):
            a, b = set(c.split()), set(r.split())
            raw.append(2 * len(a & b) / (len(a) + len(b)) if a and b else 0.0)
        f1 = raw if baseline is None else [(s - baseline.f1) / (1 - baseline.f1) for s in raw]
        mean, raw_mean = sum(f1) / len(f1), sum(raw) / len(raw)
        return BertScoreResult(
            precision=f1,
            recall=f1,
            f1=f1,
            precision_mean=mean,
            recall_mean=mean,
            f1_mean=mean,
            model="overlap",
            num_layers=1,
            hash=self.hash if baseline is None else f"{self.hash}-{baseline.tag}",
            pairs=len(f1),
            empty=sum(1 for c in candidates if not c),
            truncated=0,
            cache_hits=0,
            cache_misses=0,
            baseline=baseline,
            raw_precision_mean=raw_mean,
            raw_recall_mean=raw_mean,
            raw_f1_mean=raw_mean,
        )


class FakeJudge:
    """Scores each item from a table keyed by candidate; None = not judged."""

    def __init__(
        self, table: dict[str, float | None] | None = None, error: Exception | None = None
    ):
        self.table = table or {}
        self.error = error
        self.requests: list[tuple[str, list[JudgeItem], float | None]] = []

    async def score(
        self, model_id: str, items: Sequence[JudgeItem], timeout: float | None
    ) -> JudgeBatch:
        self.requests.append((model_id, list(items), timeout))
        if self.error:
            raise self.error
        return JudgeBatch(
            scores=tuple(self.table.get(i.candidate, 80.0) for i in items),
            provider_model="fake-judge-1",
        )


def make(
    judge: FakeJudge | None = None,
    min_coverage: float = 0.6,
    rescale: RescaleMode = RescaleMode.NONE,
    scorer: OverlapScorer | None = None,
) -> Evaluator:
    options = EvaluatorOptions(judge_min_coverage=min_coverage, bertscore_rescale=rescale)
    the_scorer = scorer or OverlapScorer()
    return Evaluator(lambda: the_scorer, judge, options, EvaluatorMetrics())


GEN = dict(
    task=TaskType.GENERATION, predictions=["a b", "c d", "e f"], references=["a b", "c x", "y z"]
)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (EvaluationInput(task=None, predictions=["a"], references=["a"]), "task_type"),
        (EvaluationInput(task=TaskType.GENERATION, predictions=[], references=[]), "predictions"),
        (
            EvaluationInput(task=TaskType.CLASSIFICATION, predictions=["a", "b"], references=["a"]),
            "references",
        ),
        (EvaluationInput(**GEN, prompts=["p"]), "prompts"),
        (EvaluationInput(**GEN, weights=Weights(0.5, 0.6)), "weights"),
        (EvaluationInput(**GEN, weights=Weights(-0.5, 1.5)), "weights.bertscore"),
        (EvaluationInput(**GEN, weights=Weights(float("nan"), 0.6)), "weights.bertscore"),
        (
            EvaluationInput(**GEN, judge=JudgeOptions(enabled=True, sample_size=0)),
            "judge.sample_size",
        ),
        (
            EvaluationInput(
                task=TaskType.CLASSIFICATION,
                predictions=["a"],
                references=["a"],
                judge=JudgeOptions(enabled=True),
            ),
            "judge.enabled",
        ),
        (
            EvaluationInput(
                task=TaskType.GENERATION,
                predictions=["a", "b", "c"],
                references=["same", " same ", ""],
                bertscore_rescale=RescaleMode.REFERENCES,
            ),
            "bertscore_rescale",
        ),
    ],
)
async def test_bad_input_names_the_field(request_: EvaluationInput, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await make(FakeJudge()).evaluate(request_)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


async def test_classification_objective_is_macro_f1() -> None:
    result = await make().evaluate(
        EvaluationInput(
            task=TaskType.CLASSIFICATION, predictions=["x", "y", "y"], references=["x", "y", "x"]
        )
    )
    assert result.objective_name == "f1_macro"
    assert result.classification is not None
    assert result.objective == result.classification.f1_macro == pytest.approx(2 / 3)


async def test_generation_without_judge_is_bertscore(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    result = await make().evaluate(EvaluationInput(**GEN))
    assert result.objective_name == "combined"
    assert result.bertscore is not None and result.judge is None
    assert result.combined == result.objective == pytest.approx(result.bertscore.f1_mean)
    assert "LLM Judge disabled, using BERTScore only" in caplog.text


async def test_generation_with_judge_combines_04_06(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    judge = FakeJudge({"a b": 90.0, "c d": 60.0, "e f": 75.0})
    request = EvaluationInput(
        **GEN,
        prompts=["p1", "p2", "p3"],
        judge=JudgeOptions(enabled=True, model_id="gemini", seed=7),
    )
    result = await make(judge).evaluate(request, deadline_seconds=30.0)
    assert result.judge is not None and result.bertscore is not None
    assert result.judge.requested == 3 and result.judge.judged == 3
    assert result.judge.mean_score == pytest.approx(75.0)
    assert result.combined == pytest.approx(0.4 * result.bertscore.f1_mean + 0.6 * 0.75)
    model_id, items, timeout = judge.requests[0]
    assert model_id == "gemini" and timeout == 30.0
    assert [i.prompt for i in items] == ["p1", "p2", "p3"]
    assert "LLM Judge enabled with model: gemini" in caplog.text
    assert "LLM Judge mean score: 75.00 (on 3 examples)" in caplog.text
    assert (
        f"Detailed evaluation: BERTScore={result.bertscore.f1_mean:.4f}, LLM Judge=75.00, Combined="
        in caplog.text
    )


async def test_custom_weights_apply() -> None:
    judge = FakeJudge({"a b": 50.0, "c d": 50.0, "e f": 50.0})
    result = await make(judge).evaluate(
        EvaluationInput(
            **GEN, judge=JudgeOptions(enabled=True), weights=Weights(bertscore=0.0, judge=1.0)
        )
    )
    assert result.combined == pytest.approx(0.5)


def test_sample_is_deterministic_and_bounded() -> None:
    a = judge_sample(100, 5, seed=3)
    assert a == judge_sample(100, 5, seed=3)
    assert a != judge_sample(100, 5, seed=4)
    assert len(set(a)) == 5 and all(0 <= i < 100 for i in a)
    assert judge_sample(3, 5, seed=0) == (0, 1, 2)


async def test_same_seed_judges_the_same_items_in_every_trial() -> None:
    judge = FakeJudge()
    preds = [f"answer {i}" for i in range(50)]
    refs = [f"reference {i}" for i in range(50)]
    evaluator = make(judge)
    for trial in range(3):
        trial_preds = [f"{p} trial{trial}" for p in preds]
        await evaluator.evaluate(
            EvaluationInput(
                task=TaskType.GENERATION,
                predictions=trial_preds,
                references=refs,
                judge=JudgeOptions(enabled=True, sample_size=5, seed=11),
            )
        )
    picked = [[i.reference for i in items] for _, items, _ in judge.requests]
    assert picked[0] == picked[1] == picked[2] and len(picked[0]) == 5


async def test_low_coverage_fails_unavailable_never_a_different_score() -> None:
    judge = FakeJudge({"a b": 90.0, "c d": None, "e f": None})
    with pytest.raises(Unavailable, match=r"scored only 1 of 3 .*LORATUNE_JUDGE_MIN_COVERAGE=0.6"):
        await make(judge).evaluate(EvaluationInput(**GEN, judge=JudgeOptions(enabled=True)))


async def test_partial_coverage_above_threshold_means_over_judged_items() -> None:
    judge = FakeJudge({"a b": 90.0, "c d": 70.0, "e f": None})
    result = await make(judge).evaluate(EvaluationInput(**GEN, judge=JudgeOptions(enabled=True)))
    assert result.judge is not None
    assert (result.judge.judged, result.judge.requested) == (2, 3)
    assert result.judge.mean_score == pytest.approx(80.0)
    assert result.judge.coverage == pytest.approx(2 / 3)


async def test_judge_not_found_reaches_the_caller() -> None:
    judge = FakeJudge(
        error=NotFound("LLM Judge model not found: 'x' (available: gemini, gigachat)")
    )
    with pytest.raises(NotFound, match="LLM Judge model not found: 'x'"):
        await make(judge).evaluate(
            EvaluationInput(**GEN, judge=JudgeOptions(enabled=True, model_id="x"))
        )


async def test_judge_without_gateway_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition, match="LORATUNE_JUDGE_ADDRESS"):
        await make(None).evaluate(EvaluationInput(**GEN, judge=JudgeOptions(enabled=True)))


async def test_engine_is_created_once() -> None:
    created = []

    def factory() -> OverlapScorer:
        created.append(1)
        return OverlapScorer()

    evaluator = Evaluator(factory, None, EvaluatorOptions(), EvaluatorMetrics())
    for _ in range(3):
        await evaluator.evaluate(EvaluationInput(**GEN))
    assert len(created) == 1


REFS = ["the card is blocked", "top up by bank transfer", "refunds take a week", "card arrived"]


async def test_reasoning_blocks_are_stripped_before_bertscore_and_judge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    scorer, judge = OverlapScorer(), FakeJudge()
    predictions = [
        "<think>the user wants a card</think>the card is blocked",
        "  top up by bank transfer  ",  # spaces only: not a reasoning block
        "<THINKING>unclosed, cut at max_new_tokens",
        "refunds take a week",
    ]
    result = await make(judge, scorer=scorer).evaluate(
        EvaluationInput(
            task=TaskType.GENERATION,
            predictions=predictions,
            references=REFS,
            judge=JudgeOptions(enabled=True, sample_size=4),
        )
    )
    cleaned = ["the card is blocked", "top up by bank transfer", "", "refunds take a week"]
    assert scorer.calls[-1][0] == cleaned
    assert [item.candidate for item in judge.requests[0][1]] == cleaned
    assert result.reasoning_stripped == 2
    assert "2 of 4 predictions had a reasoning block, stripped before scoring" in caplog.text
    assert result.bertscore is not None and result.bertscore.f1[0] == 1.0


async def test_no_reasoning_block_no_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    result = await make().evaluate(EvaluationInput(**GEN))
    assert result.reasoning_stripped == 0 and "reasoning block" not in caplog.text


async def test_references_rescaling_uses_one_baseline_per_reference_set() -> None:
    scorer = OverlapScorer()
    evaluator = make(scorer=scorer, rescale=RescaleMode.REFERENCES)
    trials = [["the card is blocked", "bank transfer", "a week", "arrived"], list(REFS)]
    results = []
    for predictions in trials:
        results.append(
            await evaluator.evaluate(
                EvaluationInput(task=TaskType.GENERATION, predictions=predictions, references=REFS)
            )
        )
    baselines = [r.bertscore.baseline for r in results if r.bertscore is not None]
    assert len(baselines) == 2 and baselines[0] == baselines[1]
    assert baselines[0] is not None and baselines[0].kind is RescaleMode.REFERENCES
    # One baseline computation (mismatched pairs) and one scoring per trial.
    baseline_calls = [c for c in scorer.calls if c[2] is None]
    assert len(baseline_calls) == 1 and len(scorer.calls) == 3
    cands, refs, _ = baseline_calls[0]
    assert all(c != r for c, r in zip(cands, refs, strict=True)) and len(cands) == 12
    b = baselines[0].f1
    for result in results:
        bert = result.bertscore
        assert bert is not None and bert.raw_f1_mean is not None
        assert bert.f1_mean == pytest.approx((bert.raw_f1_mean - b) / (1 - b))
        assert result.combined == pytest.approx(bert.f1_mean)
    assert results[1].bertscore is not None and results[1].bertscore.f1_mean == pytest.approx(1.0)


async def test_request_overrides_the_setting() -> None:
    scorer = OverlapScorer()
    evaluator = make(scorer=scorer, rescale=RescaleMode.REFERENCES)
    request = EvaluationInput(task=TaskType.GENERATION, predictions=REFS, references=REFS)
    raw = await evaluator.evaluate(dataclasses.replace(request, bertscore_rescale=RescaleMode.NONE))
    packaged = await evaluator.evaluate(
        dataclasses.replace(request, bertscore_rescale=RescaleMode.PACKAGED)
    )
    assert raw.bertscore is not None and raw.bertscore.baseline is None
    assert raw.bertscore.hash == "overlap_L1_no-idf"
    assert packaged.bertscore is not None and packaged.bertscore.baseline == PACKAGED
    assert packaged.bertscore.hash == "overlap_L1_no-idf-rescaled"
    assert len(scorer.calls) == 2  # no reference baseline was computed


async def test_packaged_rescaling_that_cannot_be_honoured() -> None:
    judge = FakeJudge()
    evaluator = make(judge, scorer=OverlapScorer(packaged=None))
    request = EvaluationInput(
        task=TaskType.GENERATION,
        predictions=REFS,
        references=REFS,
        judge=JudgeOptions(enabled=True),
        bertscore_rescale=RescaleMode.PACKAGED,
    )
    with pytest.raises(InvalidArgument) as caught:
        await evaluator.evaluate(request)
    assert caught.value.field == "bertscore_rescale"
    assert "BERTSCORE_RESCALE_PACKAGED cannot be honoured" in str(caught.value)
    assert judge.requests == []  # refused before the judge was asked
    setting = make(judge, scorer=OverlapScorer(packaged=None), rescale=RescaleMode.PACKAGED)
    with pytest.raises(FailedPrecondition, match="LORATUNE_BERTSCORE_RESCALE=packaged"):
        await setting.evaluate(dataclasses.replace(request, bertscore_rescale=None))


async def test_references_setting_falls_back_to_raw_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scorer = OverlapScorer()
    evaluator = make(scorer=scorer, rescale=RescaleMode.REFERENCES)
    result = await evaluator.evaluate(
        EvaluationInput(task=TaskType.GENERATION, predictions=["a b"], references=["a c"])
    )
    assert result.bertscore is not None and result.bertscore.baseline is None
    assert result.bertscore.hash == "overlap_L1_no-idf"
    assert "LORATUNE_BERTSCORE_RESCALE=references: needs at least 2 distinct" in caplog.text
    assert "BERTScore is not rescaled" in caplog.text
