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

A classification study also weighs an ensemble: each base's best trial together with the
floors of its bases, predicting by the mean of their validation log-probabilities (each
trial saves them, services/common/ensembles.py). Different encoders, and a fine-tuned
model and the linear probe it started from, err on different rows: on banking77-LT's
validation split (split seed 7) the mean of the all-MiniLM-L6-v2 and all-mpnet-base-v2
floors scored macro-F1 0.8721 where the better floor alone scored 0.8584. The ensemble is
never compared with the selected trial on the rows that trial was selected on (that favours
the maximum); both rules are cross-validated on the validation rows instead: each of
`CV_HALVINGS` class-stratified halvings picks by each rule on one half (the single-model
rule with its floor guard, the ensemble rule by each base's best on that half) and scores
the pick on the other, both ways. The ensemble is published when its cross-validated
macro-F1 is higher. On seeds 31 and 32 of the two-base study that comparison ranked
"each base's best + the floors" first of the rules tried (single best, each base's best,
top 2/3/5); the choice was made on validation only.
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
    "CV_HALVINGS",
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
# Random class-stratified halvings of the validation rows for the cross-validated
# comparison of the single-model rule and the ensemble rule (each halving scored both ways),
# and the resamples of the single rule's floor guard within one half.
CV_HALVINGS = 20
CV_GUARD_ROUNDS = 200


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
    # The ensemble of each base's best trial and the floors: its members, its validation
    # macro-F1 and the selected trial's by the same computation (in-sample, for reading),
    # the cross-validated macro-F1 of the ensemble rule and of the single-model rule (what
    # decides), and whether it was published (published_trial is then its best member).
    ensemble_trials: tuple[int, ...] = ()
    ensemble_value: float | None = None
    selected_macro_f1: float | None = None
    ensemble_published: bool = False
    ensemble_cross_validated: float | None = None
    single_cross_validated: float | None = None

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
            "ensemble_cross_validated": self.ensemble_cross_validated,
            "single_cross_validated": self.single_cross_validated,
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


def stratified_halvings(
    references: np.ndarray, halvings: int = CV_HALVINGS, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`halvings` random splits of the rows in two, each class's rows shuffled and cut in
    half (an odd one alternating sides), returned both ways: (choose on, score on)."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(references == c) for c in np.unique(references)]
    splits: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(halvings):
        first: list[np.ndarray] = []
        second: list[np.ndarray] = []
        for index, rows in enumerate(by_class):
            shuffled = rng.permutation(rows)
            cut = (len(rows) + (index % 2)) // 2
            first.append(shuffled[:cut])
            second.append(shuffled[cut:])
        a, b = np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
        splits += [(a, b), (b, a)]
    return splits


@dataclass(frozen=True)
class _Pool:
    """The trials an ensemble may draw on, as arrays: log-probabilities, predictions."""

    trials: Sequence[TrialScore]
    scores: tuple[np.ndarray, ...]  # each trial's (rows, classes) log-probabilities
    predictions: np.ndarray  # (trials, rows)
    floors: tuple[int, ...]  # indices of the floors in `trials`
    references: np.ndarray
    n_classes: int

    def f1(self, rows: np.ndarray) -> np.ndarray:
        """Each trial's macro-F1 on `rows`."""
        return macro_f1(self.predictions[:, rows], self.references[rows][None, :], self.n_classes)

    def single(self, rows: np.ndarray, candidates: int, seed: int) -> int:
        """The single-model rule on `rows`: the best trial, or the best floor when the
        best's gain over it is within the expected optimism (as `select` decides)."""
        f1 = self.f1(rows)
        best = int(np.argmax(f1))
        if not self.floors:
            return best
        floor = max(self.floors, key=lambda i: (f1[i], -i))
        if floor == best:
            return best
        noise = bootstrap_noise(
            self.predictions[best, rows],
            self.predictions[floor, rows],
            self.references[rows],
            rounds=CV_GUARD_ROUNDS,
            seed=seed,
        )
        return best if f1[best] - f1[floor] > noise * expected_max_of_normals(candidates) else floor

    def members(self, rows: np.ndarray | None = None) -> list[int]:
        """The ensemble rule on `rows` (all rows when None): each base's best trial, then the
        floors not already in, best first."""
        f1 = self.f1(np.arange(len(self.references)) if rows is None else rows)
        best: dict[str, int] = {}
        for index, trial in enumerate(self.trials):
            held = best.get(trial.base_model)
            if held is None or f1[index] > f1[held]:
                best[trial.base_model] = index
        chosen = set(best.values()) | set(self.floors)
        return sorted(chosen, key=lambda i: (-f1[i], i))

    def ensemble_f1(self, members: Sequence[int], rows: np.ndarray) -> float:
        combined = mean_log_probs([self.scores[i][rows] for i in members])
        return float(macro_f1(combined.argmax(axis=1), self.references[rows], self.n_classes)[0])


def _pool(
    report: SelectionReport, complete: Sequence[TrialScore], references: Sequence[int] | None
) -> _Pool | None:
    """The trials with saved scores of one shape, or None when there is nothing to weigh
    (no references, a floor without scores, label sets of different sizes)."""
    if references is None or len(references) == 0:
        return None
    refs = np.asarray(references)
    usable = [t for t in complete if t.scores is not None and t.scores.shape[0] == len(refs)]
    shapes = {t.scores.shape for t in usable if t.scores is not None}
    if len(shapes) != 1:
        return None
    floor_numbers = {n for _, n, _ in report.floors}
    if report.floor_trial is not None:
        floor_numbers.add(report.floor_trial)
    floors = tuple(i for i, t in enumerate(usable) if t.number in floor_numbers)
    if floor_numbers and len(floors) != len(floor_numbers):
        return None  # a floor without scores: the ensemble would not contain it
    scores = tuple(np.asarray(t.scores) for t in usable)
    return _Pool(
        trials=usable,
        scores=scores,
        predictions=np.stack([s.argmax(axis=1) for s in scores]),
        floors=floors,
        references=refs,
        n_classes=scores[0].shape[1],
    )


def ensemble(
    report: SelectionReport,
    complete: Sequence[TrialScore],
    references: Sequence[int] | None,
    *,
    halvings: int = CV_HALVINGS,
) -> SelectionReport:
    """`report` with the ensemble of each base's best trial and the floors weighed (see the
    module's docstring); unchanged when it would have one member or a member's scores were
    not recorded."""
    pool = _pool(report, complete, references)
    if pool is None:
        return report
    members = pool.members()
    if len(members) < 2:
        return report
    everything = np.arange(len(pool.references))
    numbers = [pool.trials[i].number for i in members]
    selected = next(
        (i for i, t in enumerate(pool.trials) if t.number == report.selected_trial), None
    )
    weighed = replace(
        report,
        ensemble_trials=tuple(numbers),
        ensemble_value=pool.ensemble_f1(members, everything),
        selected_macro_f1=None if selected is None else float(pool.f1(everything)[selected]),
    )
    if selected is None:
        return weighed  # the selected trial saved no scores: the rules cannot be compared
    single: list[float] = []
    together: list[float] = []
    for round_, (choose, score) in enumerate(stratified_halvings(pool.references, halvings)):
        pick = pool.single(choose, report.candidates, seed=round_)
        single.append(float(pool.f1(score)[pick]))
        together.append(pool.ensemble_f1(pool.members(choose), score))
    weighed = replace(
        weighed,
        single_cross_validated=float(np.mean(single)),
        ensemble_cross_validated=float(np.mean(together)),
    )
    if np.mean(together) <= np.mean(single):
        return weighed
    return replace(weighed, ensemble_published=True, published_trial=numbers[0], warning="")


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
