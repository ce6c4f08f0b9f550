"""The study's report: the noise of its selection, measured on its own validation predictions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import f1_score

from services.optimizer.core.report import (
    TrialScore,
    bootstrap_noise,
    ensemble,
    expected_max_of_normals,
    macro_f1,
    select,
)


def _labels(seed: int, classes: int = 12, per_class: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)[
        np.random.default_rng(seed).permutation(classes * per_class)
    ]


def _noisy(references: np.ndarray, accuracy: float, seed: int, classes: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(references)) > accuracy
    return np.where(wrong, rng.integers(0, classes, len(references)), references)


def test_macro_f1_is_the_evaluators() -> None:
    references = _labels(1)
    predictions = _noisy(references, 0.7, 2)
    predictions[:3] = -1  # outside the labels: wrong for every class
    ours = float(macro_f1(predictions, references, 12)[0])
    theirs = f1_score(references, predictions, labels=list(range(12)), average="macro")
    assert ours == pytest.approx(theirs)


def test_the_noise_shrinks_with_more_rows_and_vanishes_for_identical_predictions() -> None:
    small, large = _labels(3, per_class=10), _labels(3, per_class=160)
    noise_small = bootstrap_noise(_noisy(small, 0.8, 4), _noisy(small, 0.8, 5), small)
    noise_large = bootstrap_noise(_noisy(large, 0.8, 4), _noisy(large, 0.8, 5), large)
    assert 0 < noise_large < noise_small / 2.5  # ~1/sqrt(16) of it
    same = _noisy(small, 0.8, 6)
    assert bootstrap_noise(same, same, small) == 0.0
    with pytest.raises(ValueError):
        bootstrap_noise([1, 2], [1], [1, 2])


def test_the_expected_maximum_grows_with_the_trials() -> None:
    assert expected_max_of_normals(1) == 0.0
    assert expected_max_of_normals(2) == pytest.approx(0.56, abs=0.03)
    assert expected_max_of_normals(20) == pytest.approx(1.87, abs=0.03)
    rng = np.random.default_rng(0)
    simulated = rng.standard_normal((20000, 10)).max(axis=1).mean()
    assert expected_max_of_normals(10) == pytest.approx(simulated, abs=0.03)


def _trial(number: int, predictions: np.ndarray, references: np.ndarray) -> TrialScore:
    return TrialScore(number, float(macro_f1(predictions, references, 12)[0]), predictions.tolist())


def test_a_gain_within_the_noise_of_picking_the_best_publishes_the_floor() -> None:
    references = _labels(7)
    floor = _trial(0, _noisy(references, 0.80, 8), references)
    # Twenty trials no better than the floor: the best of them is ahead by chance alone.
    trials = [floor] + [
        _trial(n, _noisy(references, 0.80, 100 + n), references) for n in range(1, 21)
    ]
    report = select(trials, references.tolist(), floor=0, default=1)
    assert report.selected_trial != 0 and report.selected_value > floor.value
    assert report.published_trial == 0
    assert report.noise is not None and report.expected_optimism is not None
    assert report.selected_value - floor.value <= report.expected_optimism
    assert (
        "the floor was published" in report.warning
        and f"#{report.selected_trial}" in report.warning
    )
    assert report.default_trial == 1 and report.default_value == trials[1].value
    assert report.to_json()["published_trial"] == 0


def test_a_clear_gain_publishes_the_selected_trial() -> None:
    references = _labels(9)
    floor = _trial(0, _noisy(references, 0.60, 10), references)
    better = _trial(1, _noisy(references, 0.95, 11), references)
    report = select([floor, better], references.tolist(), floor=0, default=1)
    assert report.published_trial == 1 and not report.warning
    assert report.selected_value - report.floor_value > report.expected_optimism  # type: ignore[operator]


def test_without_a_floor_or_predictions_the_best_is_published_and_the_report_says_why() -> None:
    references = _labels(12)
    a, b = (
        _trial(0, _noisy(references, 0.6, 1), references),
        _trial(1, _noisy(references, 0.9, 2), references),
    )
    assert select([a, b], references.tolist(), floor=None, default=None).published_trial == 1
    blind = select([a, TrialScore(1, b.value, None)], references.tolist(), floor=0, default=None)
    assert blind.published_trial == 1 and "not recorded" in blind.warning
    # The floor itself the best: nothing to compare.
    top = select([b, a], references.tolist(), floor=1, default=None)
    assert top.published_trial == 1 and top.noise is None and not top.warning


def _member(
    number: int, base: str, right: np.ndarray, references: np.ndarray, classes: int = 12
) -> TrialScore:
    """A trial confident where it is right and hesitant where it is wrong (the right class
    its close second): the log-probabilities a calibrated classifier saves."""
    wrong = (references + 1) % classes
    logits = np.zeros((len(references), classes))
    rows = np.arange(len(references))
    logits[rows, references] = np.where(right, 4.0, 1.0)
    logits[rows, wrong] = np.where(right, 0.0, 1.5)
    scores = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    predictions = scores.argmax(axis=1)
    value = float(macro_f1(predictions, references, classes)[0])
    return TrialScore(number, value, predictions.tolist(), base_model=base, scores=scores)


def test_bases_that_err_on_different_rows_publish_their_ensemble() -> None:
    references = _labels(21, per_class=20)
    rng = np.random.default_rng(22)
    trials = [
        _member(0, "small", rng.random(len(references)) < 0.70, references),  # floors
        _member(1, "large", rng.random(len(references)) < 0.72, references),
        _member(2, "small", rng.random(len(references)) < 0.60, references),
        _member(3, "large", rng.random(len(references)) < 0.75, references),
    ]
    picked = select(trials, references.tolist(), floor=1, default=2, candidates=4)
    report = ensemble(picked, trials, references.tolist())
    # Each base's best, the best first.
    assert report.ensemble_trials == (3, 0)
    assert report.ensemble_value is not None and report.selected_macro_f1 is not None
    assert report.ensemble_value > report.selected_macro_f1 + 0.1  # errors on other rows
    assert report.ensemble_published and report.published_trial == 3
    assert report.to_json()["ensemble_trials"] == [3, 0]


def test_an_ensemble_that_does_not_predict_better_is_reported_not_published() -> None:
    references = _labels(23, per_class=20)
    right = np.random.default_rng(24).random(len(references)) < 0.8
    twins = [_member(0, "small", right, references), _member(1, "large", right, references)]
    picked = select(twins, references.tolist(), floor=0, default=None)
    report = ensemble(picked, twins, references.tolist())
    assert report.ensemble_trials == (0, 1) and report.ensemble_value == report.selected_macro_f1
    assert not report.ensemble_published and report.published_trial == 0


def test_one_base_or_unrecorded_scores_leave_the_report_as_it_was() -> None:
    references = _labels(25, per_class=20)
    rng = np.random.default_rng(26)
    one_base = [_member(n, "small", rng.random(len(references)) < 0.7, references) for n in (0, 1)]
    picked = select(one_base, references.tolist(), floor=0, default=None)
    assert ensemble(picked, one_base, references.tolist()) == picked
    blind = [one_base[0], replace(one_base[1], base_model="large", scores=None)]
    picked = select(blind, references.tolist(), floor=0, default=None)
    assert ensemble(picked, blind, references.tolist()) == picked


def test_an_ensemble_must_beat_the_floor_by_more_than_the_noise() -> None:
    # Two bases barely apart, many candidates: the gain over the floor is within the
    # expected optimism, so the floor stays published even though the ensemble is ahead.
    references = _labels(27, per_class=10)
    rng = np.random.default_rng(28)
    base_right = rng.random(len(references)) < 0.8
    other = base_right.copy()
    flip = rng.choice(len(references), 4, replace=False)
    other[flip] = ~other[flip]
    trials = [_member(0, "small", base_right, references), _member(1, "large", other, references)]
    picked = select(trials, references.tolist(), floor=0, default=None, candidates=200)
    report = ensemble(picked, trials, references.tolist())
    assert report.ensemble_value is not None and report.selected_macro_f1 is not None
    assert report.ensemble_value > report.selected_macro_f1
    assert report.ensemble_trials and not report.ensemble_published
    assert report.published_trial == picked.published_trial
