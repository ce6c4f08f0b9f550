"""BertScoreEngine equals bert_score.score on the packaged MiniLM model, with and without cache."""

from __future__ import annotations

import os
import pathlib
import threading
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import bert_score
import numpy as np
import pytest
import torch

from services.evaluator.core import bertscore as bertscore_module
from services.evaluator.core.bertscore import (
    BertScoreEngine,
    BertScoreEnginePool,
    BertScoreResult,
    _load_baseline,
    default_model,
    packaged_minilm_path,
)

LAYERS = 6

CANDIDATES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "I love machine learning and natural language processing.",
    "The weather is nice today, let's go for a walk.",
    "He bought three apples and two oranges at the market.",
    "Paris is the capital of France.",
    "The invoice was paid on 12.03.2024 by bank transfer.",
    "Neural networks are trained with gradient descent.",
    "short",
    "Please debit account 60 and credit account 51.",
    "Кошка сидит на коврике.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Сегодня хорошая погода, пойдём гулять.",
    "Счёт оплачен банковским переводом двенадцатого марта.",
    "Москва — столица России.",
    "Дебет 60, кредит 51: оплата поставщику.",
    "Mixed: the отчёт is ready for review.",
    "Numbers 1 2 3 4 5 6 7 8 9 10 and symbols %$#@!",
    "The cat sat on the mat.",  # duplicate candidate
    "A much longer candidate sentence that goes on and on about many unrelated topics "
    "such as cooking, astronomy, accounting rules and the history of the Roman empire.",
]
REFERENCES = [
    "A cat was sitting on a mat.",
    "The fast brown fox leaped over a sleepy dog.",
    "Machine learning and NLP are my passion.",
    "Nice weather today; let us take a walk.",
    "She bought two apples at the shop.",
    "The capital of France is Paris.",
    "Payment of the invoice was made on March 12, 2024.",
    "Gradient descent is used to train neural networks.",
    "a considerably longer reference than the candidate",
    "Debit 60, credit 51.",
    "Кот сидел на ковре.",
    "Лиса перепрыгнула через собаку.",
    "Погода хорошая, идём на прогулку.",
    "Оплата счёта произведена 12 марта переводом.",
    "Столица России — Москва.",
    "Дебет 60, кредит 51: оплата поставщику.",
    "The report is ready for review.",
    "digits one two three",
    "A cat was sitting on a mat.",  # duplicate reference
    "Cooking.",
]
LONG_TEXT = " ".join(f"word{i % 50} alpha beta" for i in range(400))  # > 512 word pieces


@pytest.fixture(scope="module")
def model_path() -> str:
    return packaged_minilm_path()


@pytest.fixture(scope="module")
def engine(model_path: str) -> BertScoreEngine:
    return BertScoreEngine(model_path, LAYERS, device="cpu")


@pytest.fixture(scope="module")
def engine_nocache(model_path: str) -> BertScoreEngine:
    return BertScoreEngine(model_path, LAYERS, device="cpu", cache_max_bytes=0)


@pytest.fixture
def fresh(engine: BertScoreEngine) -> Iterator[BertScoreEngine]:
    engine.clear_cache()
    yield engine


def library(
    cands: list[str], refs: list[str], model_path: str, **kw: object
) -> tuple[list[float], list[float], list[float], str]:
    (p, r, f), h = bert_score.score(
        cands,
        refs,
        model_type=model_path,
        num_layers=LAYERS,
        batch_size=64,
        device="cpu",
        return_hash=True,
        **kw,
    )
    return p.tolist(), r.tolist(), f.tolist(), h


def assert_close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=tol)


def assert_same(a: BertScoreResult, b: BertScoreResult, tol: float = 1e-6) -> None:
    assert_close(a.precision, b.precision, tol)
    assert_close(a.recall, b.recall, tol)
    assert_close(a.f1, b.f1, tol)


def test_equals_bert_score(fresh: BertScoreEngine, model_path: str) -> None:
    res = fresh.score(CANDIDATES, REFERENCES)
    p, r, f, h = library(CANDIDATES, REFERENCES, model_path)
    assert_close(res.precision, p, 1e-4)
    assert_close(res.recall, r, 1e-4)
    assert_close(res.f1, f, 1e-4)
    assert res.hash == h == fresh.hash
    assert res.model == model_path and res.num_layers == LAYERS
    assert res.pairs == len(CANDIDATES) and res.empty == 0 and res.truncated == 0
    assert res.f1_mean == pytest.approx(sum(f) / len(f), abs=1e-4)
    assert res.precision_mean == pytest.approx(sum(p) / len(p), abs=1e-4)
    assert res.recall_mean == pytest.approx(sum(r) / len(r), abs=1e-4)
    # Identical pair scores identically; the identical Russian pair scores ~1.
    assert res.f1[0] == res.f1[18]
    assert res.f1[15] == pytest.approx(1.0, abs=1e-5)


def test_idf_equals_bert_score(model_path: str) -> None:
    eng = BertScoreEngine(model_path, LAYERS, device="cpu", idf=True)
    cands, refs = CANDIDATES[:12], REFERENCES[:12]
    p, r, f, h = library(cands, refs, model_path, idf=True, nthreads=0)
    for _ in range(2):  # second call: every embedding from the cache
        res = eng.score(cands, refs)
        assert_close(res.precision, p, 1e-4)
        assert_close(res.recall, r, 1e-4)
        assert_close(res.f1, f, 1e-4)
        assert res.hash == h and "_idf_" in h
    assert res.cache_misses == 0


def test_cache_on_off_identical(fresh: BertScoreEngine, engine_nocache: BertScoreEngine) -> None:
    half = len(CANDIDATES) // 2
    first_c, second_c = CANDIDATES[:half], [c + " Indeed." for c in CANDIDATES[:half]]
    refs = REFERENCES[:half]
    distinct_refs = len(set(refs))

    a1, b1 = fresh.score(first_c, refs), engine_nocache.score(first_c, refs)
    assert a1.cache_hits == 0 and a1.cache_misses == len(set(first_c + refs))
    assert_same(a1, b1, 0.0)  # same batches either way: bitwise equal

    a2, b2 = fresh.score(second_c, refs), engine_nocache.score(second_c, refs)
    assert a2.cache_hits == distinct_refs
    assert a2.cache_misses == len(set(second_c))
    assert b2.cache_hits == 0 and engine_nocache.cache_stats() == (0, 0)
    assert_same(a2, b2, 1e-6)
    assert a2.f1_mean == pytest.approx(b2.f1_mean, abs=1e-6)

    a3 = fresh.score(second_c, refs)  # all cached now
    assert a3.cache_misses == 0 and a3.cache_hits == len(set(second_c + refs))
    assert_same(a3, a2, 0.0)


def test_empty_texts_score_zero(engine: BertScoreEngine, model_path: str) -> None:
    cands = ["", "The cat sat on the mat.", "   \n\t", "Кошка сидит на коврике.", "ok", "x"]
    refs = ["A cat was sitting.", "A cat was sitting on a mat.", "Кот.", "", " ", "y"]
    res = engine.score(cands, refs)
    assert res.empty == 4 and res.pairs == 6
    for i in (0, 2, 3, 4):
        assert res.precision[i] == res.recall[i] == res.f1[i] == 0.0
    live = [1, 5]
    p, _, f, _ = library([cands[i] for i in live], [refs[i] for i in live], model_path)
    assert_close([res.f1[i] for i in live], f, 1e-4)
    assert_close([res.precision[i] for i in live], p, 1e-4)
    assert res.f1_mean == pytest.approx(sum(f) / 6, abs=1e-4)  # zeros are in the mean
    assert res.precision_mean == pytest.approx(sum(p) / 6, abs=1e-4)

    all_empty = engine.score(["", " "], ["x", ""])
    assert all_empty.empty == 2 and all_empty.f1 == [0.0, 0.0] and all_empty.f1_mean == 0.0
    assert all_empty.cache_hits == 0 and all_empty.cache_misses == 0


def test_empty_call(engine: BertScoreEngine) -> None:
    res = engine.score([], [])
    assert res.pairs == 0 and res.f1 == [] and res.precision == [] and res.recall == []
    assert res.precision_mean == res.recall_mean == res.f1_mean == 0.0
    assert res.hash == engine.hash


def test_long_text_truncated(engine: BertScoreEngine, model_path: str) -> None:
    cands = [LONG_TEXT, "The cat sat on the mat.", LONG_TEXT]
    refs = ["word1 alpha beta word2", LONG_TEXT, ""]  # the third pair is empty: not counted
    res = engine.score(cands, refs)
    assert res.truncated == 2 and res.empty == 1
    _, r, f, _ = library(cands[:2], refs[:2], model_path)
    assert_close(res.f1[:2], f, 1e-4)
    assert_close(res.recall[:2], r, 1e-4)
    assert engine.score(cands, refs).truncated == 2  # also from the cache
    # "word" is one word piece: 510 + [CLS] + [SEP] = 512 fits exactly, one more does not.
    at_limit, over = "word " * 510, "word " * 511
    assert engine.score([at_limit, over], ["A cat.", "A cat."]).truncated == 1


def test_cache_bounded_with_evictions(model_path: str) -> None:
    bound = 100_000  # MiniLM: ~1.5 KB per token, so a handful of short sentences
    eng = BertScoreEngine(model_path, LAYERS, device="cpu", cache_max_bytes=bound, batch_size=8)
    cands = [f"Candidate sentence number {i} about topic {i * 7}." for i in range(20)]
    refs = [f"Reference text {i}, written for test {i * 3}." for i in range(20)]
    res = eng.score(cands, refs)
    assert res.cache_misses == 40
    entries, size = eng.cache_stats()
    assert 0 < size <= bound and 0 < entries < 40
    # Evicted sentences are recomputed with the same result.
    again = eng.score(cands, refs)
    assert again.cache_misses > 0 and again.cache_hits + again.cache_misses == 40
    assert_same(again, res, 1e-6)
    assert 0 < eng.cache_stats()[1] <= bound


def test_threads_agree(fresh: BertScoreEngine) -> None:
    eng = fresh
    expected = eng.score(CANDIDATES, REFERENCES)
    eng.clear_cache()
    results: dict[int, BertScoreResult] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = eng.score(CANDIDATES[k:] + CANDIDATES[:k], REFERENCES[k:] + REFERENCES[:k])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(0, 16, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    for k, res in results.items():
        assert_close(res.f1, expected.f1[k:] + expected.f1[:k], 1e-4)


def test_mismatched_lengths(engine: BertScoreEngine) -> None:
    with pytest.raises(ValueError, match=r"2 candidates.*1 references"):
        engine.score(["a", "b"], ["a"])


def test_local_path_needs_num_layers(model_path: str) -> None:
    with pytest.raises(ValueError, match="num_layers"):
        BertScoreEngine(model_path)
    with pytest.raises(ValueError, match="num_layers"):
        BertScoreEnginePool().get(model_path)


def test_rescale_with_baseline(model_path: str) -> None:
    with pytest.raises(ValueError, match="baseline"):
        BertScoreEngine(model_path, LAYERS, rescale_with_baseline=True)
    with pytest.raises(ValueError, match="baseline"):
        _load_baseline("en", "no-such-model", 3)
    with pytest.raises(ValueError, match="lang"):
        _load_baseline(None, "roberta-large", 17)
    # Same numbers bert-score reads for its default English model.
    path = os.path.join(
        os.path.dirname(bert_score.__file__), "rescale_baseline/en/roberta-large.tsv"
    )
    expected = np.loadtxt(path, delimiter=",", skiprows=1)[17, 1:]  # LAYER,P,R,F
    assert _load_baseline("en", "roberta-large", 17).tolist() == pytest.approx(
        list(expected), abs=1e-7
    )


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_rescale_math_equals_bert_score(
    model_path: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MiniLM has no packaged baseline: give both sides the same made-up one.
    rows = ["LAYER,P,R,F"] + [f"{i},0.{i + 1},0.{i + 2},0.{i + 3}" for i in range(LAYERS + 1)]
    baseline = tmp_path / "minilm.tsv"
    baseline.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(
        bertscore_module,
        "_load_baseline",
        lambda lang, model, layers: torch.tensor(
            np.loadtxt(baseline, delimiter=",", skiprows=1)[layers, 1:]
        ).float(),
    )
    eng = BertScoreEngine(model_path, LAYERS, device="cpu", rescale_with_baseline=True)
    assert eng.hash.endswith("-rescaled")
    cands, refs = [*CANDIDATES[:6], ""], [*REFERENCES[:6], "x"]
    res = eng.score(cands, refs)
    p, r, f, _ = library(
        cands[:6],
        refs[:6],
        model_path,
        lang="en",
        rescale_with_baseline=True,
        baseline_path=str(baseline),
    )
    assert_close(res.precision[:6], p, 1e-4)
    assert_close(res.recall[:6], r, 1e-4)
    assert_close(res.f1[:6], f, 1e-4)
    assert res.f1[6] == 0.0 and res.empty == 1  # empty pairs stay 0.0, not rescaled


def test_pool_returns_same_engine(model_path: str) -> None:
    pool = BertScoreEnginePool()
    a = pool.get(model_path, LAYERS, device="cpu", cache_max_bytes=1 << 20)
    b = pool.get(model_path, LAYERS, device="cpu", batch_size=8)
    assert a is b and len(pool) == 1
    assert pool.get(model_path, LAYERS, lang="ru") is a  # lang only matters when rescaling
    got: list[BertScoreEngine] = []
    threads = [
        threading.Thread(target=lambda: got.append(pool.get(model_path, LAYERS))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(e is a for e in got) and len(pool) == 1


def test_defaults() -> None:
    assert default_model() == ("roberta-large", 17)
    path = packaged_minilm_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
