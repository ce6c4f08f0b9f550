"""What a study bought: its floor, its default trial, the trial it selected, and the noise.

A classification study's validation split is small where it matters (10 rows of a rare
class), so the best of many trials on it is optimistic: picking the maximum of m noisy
scores adds about `noise x E[max of m standard normals]` on its own. The study measures
that noise on its own predictions, without test data: the standard deviation of the
selected trial's macro-F1 minus the floor's (the probe-only trial, a class-balanced
logistic regression on the frozen features) over class-stratified bootstrap resamples of
the validation rows (the same rows, paired). The rule, fixed before any test score was
read: the selected trial is published only when its gain over the floor exceeds that
expected optimism; otherwise the floor is, with a warning that says so. The floor is
deterministic and not selected among many, so its validation score is not inflated.

A study of several base models also tries their ensemble: the best trial of each base,
predicting together by the mean of their validation log-probabilities (each trial saves
them, services/common/ensembles.py). Different encoders err on different rows: on
banking77-LT's validation split (split seed 7) the mean of the all-MiniLM-L6-v2 and
all-mpnet-base-v2 floors scored macro-F1 0.8721 where the better floor alone scored 0.8584.
The ensemble is published when it predicts validation better than the selected trial and
beats the floor by more than the same expected optimism as a single trial must (its
members are the selection's own picks); both compared by the same macro-F1 over the
recorded predictions.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import optuna

from services.common.ensembles import mean_log_probs, read_validation_scores
from services.optimizer.core.results import read_predictions

__all__ = [
    "BOOTSTRAP_ROUNDS",
    "SelectionReport",
    "bootstrap_noise",
    "ensemble",
    "expected_max_of_normals",
    "macro_f1",
    "select",
    "selection_report",
]

# Resamples of the validation rows for the noise estimate.
BOOTSTRAP_ROUNDS = 1000


@dataclass(frozen=True)
class TrialScore:
    """A trial as the report sees it: its number, validation objective and predictions."""

    number: int
    value: float
    predictions: Sequence[int] | None = None  # label indices, None when not recorded
    base_model: str = ""
    scores: np.ndarray | None = None  # (rows, classes) validation log-probabilities


@dataclass(frozen=True)
class SelectionReport:
    """The floor, the default trial, the best on validation and what was published."""

    selected_trial: int  # the best validation objective
    selected_value: float
    published_trial: int  # the selected trial, or the floor when its gain is within noise
    trials_compared: int  # COMPLETE trials that ran their own job
    floor_trial: int | None = None
    floor_value: float | None = None
    default_trial: int | None = None
    default_value: float | None = None
    noise: float | None = None  # bootstrap SD of (selected - floor) on validation
    expected_optimism: float | None = None  # noise x E[max of `candidates` normals]
    # Evaluations the selection chose among (the m of the maximum): every evaluated epoch of
    # every trial that ran its own job, pruned ones included (each trial keeps its best
    # epoch, and a pruned trial was a candidate that lost).
    candidates: int = 0
    warning: str = ""
    # Each base's floor: (base model, trial, validation objective); the floor is the best.
    floors: tuple[tuple[str, int, float], ...] = ()
    # The ensemble of each base's best trial (several bases only): its members, its
    # validation macro-F1 and the selected trial's by the same computation, and whether it
    # was published (published_trial is then its best member).
    ensemble_trials: tuple[int, ...] = ()
    ensemble_value: float | None = None
    selected_macro_f1: float | None = None
    ensemble_published: bool = False

    def to_json(self) -> dict[str, object]:
        """The report as study.json and the API carry it."""
        return {
            "floor_trial": self.floor_trial,
            "floor_value": self.floor_value,
            "default_trial": self.default_trial,
            "default_value": self.default_value,
            "selected_trial": self.selected_trial,
            "selected_value": self.selected_value,
            "trials_compared": self.trials_compared,
            "candidates": self.candidates,
            "noise": self.noise,
            "expected_optimism": self.expected_optimism,
            "published_trial": self.published_trial,
            "warning": self.warning,
            "floors": [
                {"base_model": base, "trial": trial, "objective": value}
                for base, trial, value in self.floors
            ],
            "ensemble_trials": list(self.ensemble_trials),
            "ensemble_value": self.ensemble_value,
            "selected_macro_f1": self.selected_macro_f1,
            "ensemble_published": self.ensemble_published,
        }


def macro_f1(predictions: np.ndarray, references: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each row of `predictions` ((rounds, rows) label indices) against the same
    rows of `references`, over the classes present in the references (the evaluator's
    definition); a prediction of -1 (outside the labels) is wrong for every class."""
    predictions = np.atleast_2d(predictions)
    references = np.atleast_2d(references)
    rounds = predictions.shape[0]
    offsets = (np.arange(rounds) * (n_classes + 1))[:, None]
    size = rounds * (n_classes + 1)

    def counts(values: np.ndarray) -> np.ndarray:
        shifted = np.where(values < 0, n_classes, values) + offsets
        return np.bincount(shifted.ravel(), minlength=size).reshape(rounds, n_classes + 1)

    hits = counts(np.where(predictions == references, references, -1))[:, :n_classes]
    predicted = counts(predictions)[:, :n_classes]
    actual = counts(references)[:, :n_classes]
    present = actual > 0
    denominator = predicted + actual
    f1 = np.divide(2.0 * hits, denominator, out=np.zeros(hits.shape), where=denominator > 0)
    return np.asarray((f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1))


def bootstrap_noise(
    a: Sequence[int],
    b: Sequence[int],
    references: Sequence[int],
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> float:
    """Standard deviation of macro-F1(a) - macro-F1(b) over `rounds` resamples of the rows,
    each class's rows drawn with replacement to its own count (paired: the same rows)."""
    pa, pb, ref = np.asarray(a), np.asarray(b), np.asarray(references)
    if not (len(pa) == len(pb) == len(ref)) or len(ref) == 0:
        raise ValueError("predictions and references must be of one non-zero length")
    n_classes = int(max(pa.max(initial=0), pb.max(initial=0), ref.max(initial=0))) + 1
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(ref == c) for c in np.unique(ref)]
    rows = np.concatenate(
        [rng.choice(members, size=(rounds, len(members))) for members in by_class], axis=1
    )
    difference = macro_f1(pa[rows], ref[rows], n_classes) - macro_f1(pb[rows], ref[rows], n_classes)
    return float(difference.std(ddof=1)) if rounds > 1 else 0.0


def expected_max_of_normals(m: int) -> float:
    """E[max of m independent standard normals] (Blom's approximation; 0 for m <= 1)."""
    if m <= 1:
        return 0.0
    return statistics.NormalDist().inv_cdf((m - 0.375) / (m + 0.25))


def select(
    complete: Sequence[TrialScore],
    references: Sequence[int] | None,
    *,
    floor: int | None,
    default: int | None,
    candidates: int = 0,
) -> SelectionReport:
    """The report of a study's COMPLETE trials (those that ran their own job).

    The selected trial is the best validation objective (the earliest of equals). With a
    floor and both trials' predictions recorded, the selected trial is published only when
    it beats the floor by more than the expected optimism of a maximum over the trials.
    """
    if not complete:
        raise ValueError("no COMPLETE trial")
    best = complete[0]
    for trial in complete[1:]:
        if trial.value > best.value:
            best = trial
    numbers = {t.number: t for t in complete}
    floor_trial = numbers.get(floor) if floor is not None else None
    default_trial = numbers.get(default) if default is not None else None
    report = SelectionReport(
        selected_trial=best.number,
        selected_value=best.value,
        published_trial=best.number,
        trials_compared=len(complete),
        candidates=max(candidates, len(complete)),
        floor_trial=None if floor_trial is None else floor_trial.number,
        floor_value=None if floor_trial is None else floor_trial.value,
        default_trial=None if default_trial is None else default_trial.number,
        default_value=None if default_trial is None else default_trial.value,
    )
    if floor_trial is None or floor_trial.number == best.number:
        return report
    if best.predictions is None or floor_trial.predictions is None or not references:
        return replace(
            report,
            warning="the validation predictions were not recorded: the selection's noise "
            "could not be measured",
        )
    noise = bootstrap_noise(best.predictions, floor_trial.predictions, references)
    m = max(candidates, len(complete))
    factor = expected_max_of_normals(m)
    optimism = noise * factor
    gain = best.value - floor_trial.value
    if gain > optimism:
        return replace(report, noise=noise, expected_optimism=optimism)
    return replace(
        report,
        noise=noise,
        expected_optimism=optimism,
        published_trial=floor_trial.number,
        warning=(
            f"the best trial (#{best.number}, {best.value:.4f}) beats the floor "
            f"(#{floor_trial.number}, {floor_trial.value:.4f}) by {gain:.4f} on validation, "
            f"no more than the best of {m} evaluations gains by chance "
            f"({optimism:.4f} = noise {noise:.4f} x {factor:.2f}): the floor was published"
        ),
    )


def ensemble(
    report: SelectionReport,
    complete: Sequence[TrialScore],
    references: Sequence[int] | None,
) -> SelectionReport:
    """`report` with the ensemble of each base's best trial weighed (see the module's
    docstring); unchanged for one base, or when a member's scores were not recorded."""
    best: dict[str, TrialScore] = {}
    for trial in complete:
        held = best.get(trial.base_model)
        if held is None or trial.value > held.value:
            best[trial.base_model] = trial
    members = sorted(best.values(), key=lambda t: -t.value)
    if len(members) < 2 or references is None or len(references) == 0:
        return report
    scores = [m.scores for m in members]
    if any(s is None or s.shape[0] != len(references) for s in scores):
        return report
    try:
        combined = mean_log_probs([s for s in scores if s is not None])
    except ValueError:  # the members' label sets differ in size
        return report
    refs = np.asarray(references)
    n_classes = combined.shape[1]
    predictions = combined.argmax(axis=1)
    value = float(macro_f1(predictions, refs, n_classes)[0])
    numbers = {t.number: t for t in complete}
    selected = numbers[report.selected_trial]
    selected_f1 = (
        float(macro_f1(np.asarray(selected.predictions), refs, n_classes)[0])
        if selected.predictions is not None
        else None
    )
    weighed = replace(
        report,
        ensemble_trials=tuple(m.number for m in members),
        ensemble_value=value,
        selected_macro_f1=selected_f1,
    )
    if selected_f1 is None or value <= selected_f1:
        return weighed
    floor = numbers.get(report.floor_trial) if report.floor_trial is not None else None
    if floor is not None and floor.predictions is not None:
        noise = bootstrap_noise(predictions.tolist(), floor.predictions, references)
        factor = expected_max_of_normals(report.candidates)
        floor_f1 = float(macro_f1(np.asarray(floor.predictions), refs, n_classes)[0])
        if value - floor_f1 <= noise * factor:
            return weighed
    return replace(
        weighed,
        ensemble_published=True,
        published_trial=members[0].number,
        warning="",
    )


def selection_report(trials: Sequence[optuna.trial.FrozenTrial]) -> SelectionReport | None:
    """The report of a study from its stored trials (blocking: reads their predictions);
    None while no trial that ran its own job is COMPLETE."""
    complete = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.value is not None
        and "same_as" not in t.user_attrs
    ]
    if not complete:
        return None
    # Every evaluation the selection chose among: each evaluated epoch of each trial that ran
    # its own job (COMPLETE or PRUNED; the floor's one pass included).
    candidates = sum(
        max(1, len(t.user_attrs.get("epochs", [])))
        for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        and "same_as" not in t.user_attrs
    )
    references: list[int] | None = None
    scores = []
    for trial in complete:
        folder = Path(str(trial.user_attrs.get("artifact_dir", "")))
        recorded = read_predictions(folder, int(trial.user_attrs.get("best_epoch", 0) or 0))
        predictions = None
        if recorded is not None and (references is None or recorded[1] == references):
            predictions, references = recorded
        scores.append(
            TrialScore(
                trial.number,
                float(trial.value),  # type: ignore[arg-type]
                predictions,
                base_model=str(trial.user_attrs.get("base_model", "")),
                scores=read_validation_scores(folder) if predictions is not None else None,
            )
        )

    def role(name: str) -> list[optuna.trial.FrozenTrial]:
        return [t for t in complete if t.user_attrs.get("role") == name]

    floors = role("floor")
    # The best floor of the bases (the first of equals) is what the selection must beat.
    best_floor = max(floors, key=lambda t: float(t.value), default=None)  # type: ignore[arg-type]
    defaults = role("default")
    report = select(
        scores,
        references,
        floor=None if best_floor is None else best_floor.number,
        default=defaults[0].number if defaults else None,
        candidates=candidates,
    )
    report = replace(
        report,
        floors=tuple(
            (str(t.user_attrs.get("base_model", "")), t.number, float(t.value))  # type: ignore[arg-type]
            for t in floors
        ),
    )
    return ensemble(report, scores, references)
