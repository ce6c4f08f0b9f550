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
    stratified_halvings,
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
    number: int,
    base: str,
    right: np.ndarray,
    references: np.ndarray,
    classes: int = 12,
    sure_when_wrong: bool = False,
) -> TrialScore:
    """A trial confident where it is right and hesitant where it is wrong (the right class
    its close second): the log-probabilities a calibrated classifier saves. With
    `sure_when_wrong`, its errors are confident and push an ensemble off the right class."""
    wrong = (references + 1) % classes
    logits = np.zeros((len(references), classes))
    rows = np.arange(len(references))
    logits[rows, references] = np.where(right, 4.0, 1.0)
    logits[rows, wrong] = np.where(right, 0.0, 12.0 if sure_when_wrong else 1.5)
    scores = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    predictions = scores.argmax(axis=1)
    value = float(macro_f1(predictions, references, classes)[0])
    return TrialScore(number, value, predictions.tolist(), base_model=base, scores=scores)


def test_halvings_split_every_class_in_two_and_are_used_both_ways() -> None:
    references = _labels(20, per_class=9)
    splits = stratified_halvings(references, halvings=5)
    assert len(splits) == 10
    for (choose, score), (back_score, back_choose) in zip(splits[::2], splits[1::2], strict=True):
        assert np.array_equal(choose, back_choose) and np.array_equal(score, back_score)
        assert not set(choose) & set(score)
        assert len(choose) + len(score) == len(references)
        for c in range(12):
            sizes = int((references[choose] == c).sum()), int((references[score] == c).sum())
            assert sorted(sizes) == [4, 5]  # 9 rows a class
    assert not np.array_equal(splits[0][0], splits[2][0])  # each halving drawn anew


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
    # Each base's best, then the floor not already in, the best first.
    assert report.ensemble_trials == (3, 1, 0)
    assert report.ensemble_value is not None and report.selected_macro_f1 is not None
    assert report.ensemble_value > report.selected_macro_f1 + 0.1  # errors on other rows
    # What decided: each rule chosen on half the rows and scored on the other half.
    assert report.ensemble_cross_validated is not None
    assert report.single_cross_validated is not None
    assert report.ensemble_cross_validated > report.single_cross_validated + 0.1
    assert report.ensemble_published and report.published_trial == 3
    assert report.to_json()["ensemble_trials"] == [3, 1, 0]


def test_one_base_ensembles_its_best_trial_with_its_floor() -> None:
    references = _labels(29, per_class=20)
    rng = np.random.default_rng(30)
    trials = [
        _member(0, "small", rng.random(len(references)) < 0.70, references),  # the floor
        _member(1, "small", rng.random(len(references)) < 0.60, references),
        _member(2, "small", rng.random(len(references)) < 0.74, references),
    ]
    picked = select(trials, references.tolist(), floor=0, default=1, candidates=3)
    report = ensemble(picked, trials, references.tolist())
    assert report.ensemble_trials == (2, 0)
    assert report.ensemble_published and report.published_trial == 2


def test_an_ensemble_that_does_not_predict_better_is_reported_not_published() -> None:
    references = _labels(23, per_class=20)
    right = np.random.default_rng(24).random(len(references)) < 0.8
    twins = [_member(0, "small", right, references), _member(1, "large", right, references)]
    picked = select(twins, references.tolist(), floor=0, default=None)
    report = ensemble(picked, twins, references.tolist())
    assert report.ensemble_trials == (0, 1) and report.ensemble_value == report.selected_macro_f1
    assert report.ensemble_cross_validated == report.single_cross_validated
    assert not report.ensemble_published and report.published_trial == 0


def test_confident_weak_floors_keep_the_single_best_published() -> None:
    # A strong trial and weak trials that are sure of their errors (the floor, and the other
    # base's best): averaged in, they drag the ensemble under the strong trial alone, on
    # held-out halves too.
    references = _labels(27, per_class=20)
    rng = np.random.default_rng(28)
    trials = [
        _member(0, "small", rng.random(len(references)) < 0.55, references, sure_when_wrong=True),
        _member(1, "large", rng.random(len(references)) < 0.55, references, sure_when_wrong=True),
        _member(2, "large", rng.random(len(references)) < 0.95, references),
    ]
    picked = select(trials, references.tolist(), floor=0, default=None, candidates=3)
    assert picked.published_trial == 2
    report = ensemble(picked, trials, references.tolist())
    assert report.ensemble_trials == (2, 0)
    assert report.ensemble_cross_validated is not None
    assert report.single_cross_validated is not None
    assert report.ensemble_cross_validated < report.single_cross_validated
    assert not report.ensemble_published and report.published_trial == 2


def test_a_floor_alone_or_unrecorded_scores_leave_the_report_as_it_was() -> None:
    references = _labels(25, per_class=20)
    rng = np.random.default_rng(26)
    # One base whose floor is its best trial: an ensemble of one is no ensemble.
    floor_best = [
        _member(0, "small", rng.random(len(references)) < 0.8, references),
        _member(1, "small", rng.random(len(references)) < 0.5, references),
    ]
    picked = select(floor_best, references.tolist(), floor=0, default=None)
    assert ensemble(picked, floor_best, references.tolist()) == picked
    # A floor without scores: the ensemble could not contain it.
    blind = [replace(floor_best[0], scores=None), replace(floor_best[1], base_model="large")]
    picked = select(blind, references.tolist(), floor=0, default=None)
    assert ensemble(picked, blind, references.tolist()) == picked
