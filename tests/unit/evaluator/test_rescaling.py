"""Rescaling BERTScore against a baseline from the references, on the packaged MiniLM model."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import bert_score
import pytest
from bert_score.utils import get_idf_dict, get_tokenizer

from services.evaluator.core.bertscore import (
    BertScoreEngine,
    BertScoreResult,
    packaged_baseline,
    packaged_minilm_path,
)
from services.evaluator.core.rescaling import (
    MAX_BASELINE_PAIRS,
    Baseline,
    BaselineUnavailable,
    ReferenceBaselines,
    RescaleMode,
    compute_reference_baseline,
    distinct_references,
    mismatched_pairs,
    references_digest,
)

LAYERS = 6

REFERENCES = [
    "Your card is blocked because the PIN was entered wrongly three times.",
    "Top-ups by bank transfer are supported.",
    "A refund usually takes 5-7 working days.",
    "Contact support to change your address.",
    "The exchange rate is updated every minute.",
    "Оплата аренды офиса по счёту № 42",
    "Your new card will arrive within a week.",
    "Cash withdrawals abroad carry a small fee.",
]
CLOSE = [  # near paraphrases of REFERENCES
    "Your card was blocked after the PIN was entered wrongly three times.",
    "Top-ups by bank transfer are possible.",
    "A refund takes 5-7 working days.",
    "Contact support to change the address.",
    "The exchange rate updates every minute.",
    "Оплата аренды офиса по счёту 42",
    "The new card arrives within a week.",
    "Withdrawing cash abroad has a small fee.",
]
LOOSER = [  # the same answers, worded further away
    "The card got blocked, too many wrong PINs.",
    "You can use a bank transfer to top up.",
    "Refunds need about a week.",
    "Support can update your address.",
    "Rates change every minute.",
    "Аренда офиса оплачена",
    "Expect the card in a few days.",
    "There is a fee for cash abroad.",
]


@pytest.fixture(scope="module")
def engine() -> BertScoreEngine:
    return BertScoreEngine(packaged_minilm_path(), LAYERS, device="cpu")


@pytest.fixture(scope="module")
def baseline(engine: BertScoreEngine) -> Baseline:
    return compute_reference_baseline(engine, REFERENCES)


class RecordingScorer:
    """A fake engine: scores 0.25 for every pair and records what it was asked."""

    hash = "fake_L1_no-idf"

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []
        self.idf_references: list[Sequence[str] | None] = []

    def score(
        self,
        candidates: Sequence[str],
        references: Sequence[str],
        baseline: Baseline | None = None,
        *,
        idf_references: Sequence[str] | None = None,
    ) -> BertScoreResult:
        self.pairs.extend(zip(candidates, references, strict=True))
        self.idf_references.append(idf_references)
        n = len(candidates)
        return BertScoreResult(
            precision=[0.25] * n,
            recall=[0.25] * n,
            f1=[0.25] * n,
            precision_mean=0.25,
            recall_mean=0.25,
            f1_mean=0.25,
            model="fake",
            num_layers=1,
            hash=self.hash,
            pairs=n,
            empty=0,
            truncated=0,
            cache_hits=0,
            cache_misses=0,
        )


@pytest.mark.parametrize("n", [2, 3, 31, 32, 33, 100, 600, 1000, 1001, 5000])
def test_mismatched_pairs_are_bounded_deterministic_and_never_self(n: int) -> None:
    pairs = mismatched_pairs(n)
    assert pairs == mismatched_pairs(n)
    assert 0 < len(pairs) <= MAX_BASELINE_PAIRS and len(set(pairs)) == len(pairs)
    assert all(i != j and 0 <= i < n and 0 <= j < n for i, j in pairs)
    if n * (n - 1) <= MAX_BASELINE_PAIRS:  # small sets: every ordered pair
        assert len(pairs) == n * (n - 1)
    else:
        assert len(pairs) == MAX_BASELINE_PAIRS
    assert mismatched_pairs(1) == [] and mismatched_pairs(0) == []


def test_mismatched_pairs_do_not_pair_neighbours_of_a_long_list() -> None:
    # Datasets are often sorted by topic: the shifts stay far from 0.
    shifts = {(j - i) % 600 for i, j in mismatched_pairs(600)}
    assert shifts == {200, 400}


def test_identical_and_empty_references_are_never_paired() -> None:
    scorer = RecordingScorer()
    refs = ["alpha", "beta", " alpha ", "", "gamma", "beta", "   "]
    assert distinct_references(refs) == ["alpha", "beta", "gamma"]
    baseline = compute_reference_baseline(scorer, refs)
    assert len(scorer.pairs) == 6 == baseline.pairs
    assert all(c.strip() != r.strip() and c.strip() and r.strip() for c, r in scorer.pairs)
    # idf weights come from the references as given (with their duplicates), as in a real call.
    assert scorer.idf_references == [refs]
    assert (baseline.precision, baseline.recall, baseline.f1) == (0.25, 0.25, 0.25)
    assert baseline.tag == f"rescaled-refs:{references_digest(refs)[:12]}"


@pytest.mark.parametrize("refs", [[], ["only one"], ["same", " same", "same ", "", "  "]])
def test_fewer_than_two_distinct_references_have_no_baseline(refs: list[str]) -> None:
    with pytest.raises(BaselineUnavailable, match="at least 2 distinct non-empty references"):
        compute_reference_baseline(RecordingScorer(), refs)


def test_digest_depends_on_every_reference_and_their_order() -> None:
    digests = {
        references_digest(refs)
        for refs in (["ab", "c"], ["a", "bc"], ["c", "ab"], ["ab", "c", ""], ["ab", "c "])
    }
    assert len(digests) == 5


def test_baseline_is_the_mean_of_mismatched_reference_pairs(
    engine: BertScoreEngine, baseline: Baseline
) -> None:
    pairs = mismatched_pairs(len(REFERENCES))
    raw = engine.score([REFERENCES[i] for i, _ in pairs], [REFERENCES[j] for _, j in pairs])
    assert baseline.kind is RescaleMode.REFERENCES and baseline.pairs == len(pairs) == 56
    assert baseline.precision == pytest.approx(raw.precision_mean, abs=1e-7)
    assert baseline.recall == pytest.approx(raw.recall_mean, abs=1e-7)
    assert baseline.f1 == pytest.approx(raw.f1_mean, abs=1e-7)
    # Unrelated sentences score well above 0 raw: that is what rescaling removes.
    assert 0.05 < baseline.f1 < 0.9


def test_baseline_is_deterministic_and_independent_of_predictions(
    engine: BertScoreEngine, baseline: Baseline
) -> None:
    # Another engine of the same settings, whose cache first holds the predictions.
    fresh = BertScoreEngine(packaged_minilm_path(), LAYERS, device="cpu")
    fresh.score(LOOSER, REFERENCES[::-1])
    again = compute_reference_baseline(fresh, REFERENCES)
    assert again.tag == baseline.tag and again.pairs == baseline.pairs
    assert again.f1 == pytest.approx(baseline.f1, abs=1e-6)
    assert again.precision == pytest.approx(baseline.precision, abs=1e-6)
    a = engine.score(CLOSE, REFERENCES, baseline)
    b = engine.score(LOOSER, REFERENCES, baseline)
    assert a.baseline == b.baseline == baseline and a.hash == b.hash


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_rescaling_equals_bert_score_with_that_baseline(
    engine: BertScoreEngine, baseline: Baseline, tmp_path: pathlib.Path
) -> None:
    # bert-score reads a custom baseline file by layer: give it ours at every row.
    rows = ["LAYER,P,R,F"] + [
        f"{layer},{baseline.precision!r},{baseline.recall!r},{baseline.f1!r}"
        for layer in range(LAYERS + 1)
    ]
    path = tmp_path / "refs.tsv"
    path.write_text("\n".join(rows) + "\n")
    cands, refs = [*CLOSE, ""], [*REFERENCES, "an empty candidate"]
    ours = engine.score(cands, refs, baseline)
    raw = engine.score(cands, refs)
    (p, r, f) = bert_score.score(
        CLOSE,
        REFERENCES,
        model_type=packaged_minilm_path(),
        num_layers=LAYERS,
        lang="en",
        rescale_with_baseline=True,
        baseline_path=str(path),
        device="cpu",
    )
    for got, want in ((ours.precision, p), (ours.recall, r), (ours.f1, f)):
        assert got[:-1] == pytest.approx(want.tolist(), abs=1e-4)
    for i, value in enumerate(raw.f1[:-1]):
        assert ours.f1[i] == pytest.approx((value - baseline.f1) / (1 - baseline.f1), abs=1e-6)
    assert ours.f1[-1] == 0.0 and ours.empty == 1  # empty pairs stay 0, as without a baseline
    assert ours.raw_f1_mean == pytest.approx(raw.f1_mean, abs=1e-7)
    assert ours.raw_precision_mean == pytest.approx(raw.precision_mean, abs=1e-7)
    assert raw.raw_f1_mean == raw.f1_mean and raw.baseline is None


def test_hash_records_the_baseline(engine: BertScoreEngine, baseline: Baseline) -> None:
    raw = engine.score(CLOSE, REFERENCES)
    rescaled = engine.score(CLOSE, REFERENCES, baseline)
    other_refs = [*REFERENCES[:-1], "Something else entirely."]
    other = engine.score(CLOSE, other_refs, compute_reference_baseline(engine, other_refs))
    assert raw.hash == engine.hash and "rescaled" not in raw.hash
    assert rescaled.hash == f"{engine.hash}-rescaled-refs:{references_digest(REFERENCES)[:12]}"
    assert len({raw.hash, rescaled.hash, other.hash}) == 3
    assert other.hash.startswith(engine.hash + "-rescaled-refs:")


def test_rescaling_stretches_the_spread_between_trials_by_one_over_one_minus_b(
    engine: BertScoreEngine, baseline: Baseline
) -> None:
    close_raw, looser_raw = engine.score(CLOSE, REFERENCES), engine.score(LOOSER, REFERENCES)
    close, looser = (engine.score(c, REFERENCES, baseline) for c in (CLOSE, LOOSER))
    raw_spread = close_raw.f1_mean - looser_raw.f1_mean
    rescaled_spread = close.f1_mean - looser.f1_mean
    assert 0 < raw_spread < 0.3  # raw F1 of two quite different trials: a narrow gap
    ratio = rescaled_spread / raw_spread
    assert ratio > 1
    assert ratio == pytest.approx(1 / (1 - baseline.f1), rel=1e-4)


def test_idf_references_weigh_tokens_like_bert_score() -> None:
    idf_engine = BertScoreEngine(packaged_minilm_path(), LAYERS, device="cpu", idf=True)
    docs = [*REFERENCES, REFERENCES[0]]
    got = idf_engine.score(CLOSE[:3], REFERENCES[:3], idf_references=docs)
    idf = get_idf_dict(docs, get_tokenizer(packaged_minilm_path(), False), nthreads=1)
    _, _, f = bert_score.score(
        CLOSE[:3],
        REFERENCES[:3],
        model_type=packaged_minilm_path(),
        num_layers=LAYERS,
        idf=idf,
        device="cpu",
    )
    assert got.f1 == pytest.approx(f.tolist(), abs=1e-4)
    assert got.f1 != pytest.approx(idf_engine.score(CLOSE[:3], REFERENCES[:3]).f1, abs=1e-4)


def test_cache_computes_once_per_reference_set_and_is_bounded() -> None:
    scorer = RecordingScorer()
    cache = ReferenceBaselines(max_entries=2)
    sets = [["a", "b"], ["a", "c"], ["b", "c"]]
    first, computed = cache.get(scorer, sets[0])
    assert computed and cache.get(scorer, list(sets[0])) == (first, False)
    for refs in sets[1:]:
        cache.get(scorer, refs)
    assert len(cache) == 2 and cache.computed == 3
    assert cache.get(scorer, sets[0])[1] is True  # evicted (least recently used)
    with pytest.raises(ValueError, match="max_entries"):
        ReferenceBaselines(max_entries=0)


def test_engine_with_its_own_packaged_baseline_refuses_another(
    engine: BertScoreEngine, baseline: Baseline, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from services.evaluator.core import bertscore as bertscore_module

    monkeypatch.setattr(
        bertscore_module, "_load_baseline", lambda lang, model, layers: torch.tensor([0.1] * 3)
    )
    packaged_engine = BertScoreEngine(
        packaged_minilm_path(), LAYERS, device="cpu", rescale_with_baseline=True
    )
    assert packaged_engine.rescales and not engine.rescales
    with pytest.raises(ValueError, match="already rescales"):
        packaged_engine.score(CLOSE, REFERENCES, baseline)


def test_packaged_baseline_is_bert_scores_and_its_hash(engine: BertScoreEngine) -> None:
    packaged = packaged_baseline("roberta-large", None, "en")
    assert packaged.kind is RescaleMode.PACKAGED and packaged.tag == "rescaled"
    assert 0.5 < packaged.f1 < 1  # roberta-large's raw scores sit high: b is large
    assert engine.hash_with(packaged) == engine.hash + "-rescaled"  # bert-score's own suffix
    with pytest.raises(ValueError, match="local model folder"):
        engine.packaged_baseline()
