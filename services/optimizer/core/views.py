"""Studies and trials as the API shows them, built from storage (no protobuf)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

from services.common.names import excerpt
from services.optimizer.core.records import Hyperparameters, StudyRecord

_STATES = {
    optuna.trial.TrialState.RUNNING: "RUNNING",
    optuna.trial.TrialState.COMPLETE: "COMPLETE",
    optuna.trial.TrialState.PRUNED: "PRUNED",
    optuna.trial.TrialState.FAIL: "FAIL",
    optuna.trial.TrialState.WAITING: "WAITING",
}
EVALUATION_FILE = "evaluation_results.json"


@dataclass(frozen=True)
class ScoredWith:
    """How the evaluation a trial is scored with came about (from its epoch's record).

    The judge's sample and how much of it was judged (a partial judgment above
    LORATUNE_JUDGE_MIN_COVERAGE is accepted, and shows here), and the attempts at that
    evaluation the evaluator refused as UNAVAILABLE before it was scored.
    """

    judge_judged: int = 0
    judge_requested: int = 0  # 0: scored without the judge
    refusals: int = 0
    last_refusal: str = ""

    @property
    def judge_coverage(self) -> float | None:
        """judged / requested of the judge's sample; None without the judge."""
        if not self.judge_requested:
            return None
        return self.judge_judged / self.judge_requested


@dataclass(frozen=True)
class TrialView:
    """A trial: what it tried, where it is, what it scored."""

    number: int
    state: str  # RUNNING, COMPLETE, PRUNED, FAIL, WAITING
    hyperparameters: Hyperparameters | None
    evaluation: Mapping[str, Any] | None  # the best epoch's result document
    artifact_dir: str
    trainer: str
    attempt: int
    failure_reason: str
    start_time: datetime | None
    end_time: datetime | None
    objective: float | None
    best_epoch: int
    epoch_objectives: Sequence[float]
    interruptions: Sequence[str]
    # The best epoch's (the latest one's while the trial runs); None before any evaluation.
    scored_with: ScoredWith | None = None
    # The COMPLETE trial whose result this one took without a job; None: it ran its own.
    same_as: int | None = None
    base_model: str = ""  # the base it trained ("" in records from before it was kept)


@dataclass(frozen=True)
class StudyView:
    """A study: its record, its trial counts and its best trial."""

    study_id: str
    record: StudyRecord
    counts: Mapping[str, int]
    best_trial: TrialView | None
    excluded_note: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # While the study waits for a trainer: why, and since when (epoch seconds).
    waiting_reason: str = ""
    waiting_since: float | None = None


def trial_view(trial: optuna.trial.FrozenTrial) -> TrialView:
    """A trial from Optuna's record of it and its user attributes."""
    attrs = trial.user_attrs
    stored = attrs.get("hyperparameters")
    artifact_dir = str(attrs.get("artifact_dir", ""))
    return TrialView(
        number=trial.number,
        state=_STATES[trial.state],
        hyperparameters=Hyperparameters.from_storage(stored) if stored else None,
        evaluation=read_evaluation(Path(artifact_dir)) if artifact_dir else None,
        artifact_dir=artifact_dir,
        trainer=str(attrs.get("trainer", "")),
        attempt=int(attrs.get("attempt", 1)),
        failure_reason=str(attrs.get("failure_reason", "")),
        start_time=trial.datetime_start,
        end_time=trial.datetime_complete,
        objective=trial.value,
        best_epoch=int(attrs.get("best_epoch", 0)),
        epoch_objectives=[float(e["objective"]) for e in attrs.get("epochs", [])],
        interruptions=list(attrs.get("interruption_reasons", [])),
        scored_with=scored_with(attrs),
        same_as=int(attrs["same_as"]) if "same_as" in attrs else None,
        base_model=str(attrs.get("base_model", "")),
    )


def scored_with(attrs: Mapping[str, Any]) -> ScoredWith | None:
    """The scored epoch's judge coverage and refusals, from the trial's `epochs` records.

    The best epoch once the trial completes (`best_epoch`), the latest one before (a
    running or pruned trial's evaluation is its latest). Records written before these
    keys existed read as judged by nobody and never refused.
    """
    epochs = attrs.get("epochs") or []
    if not epochs:
        return None
    best = int(attrs.get("best_epoch", 0))
    record = epochs[best - 1] if 0 < best <= len(epochs) else epochs[-1]
    return ScoredWith(
        judge_judged=int(record.get("judge_judged", 0)),
        judge_requested=int(record.get("judge_requested", 0)),
        refusals=int(record.get("refusals", 0)),
        last_refusal=str(record.get("last_refusal", "")),
    )


def study_view(
    study_id: str, record: StudyRecord, trials: Sequence[optuna.trial.FrozenTrial]
) -> StudyView:
    """A study's view from its record and trials."""
    counts = dict.fromkeys([*_STATES.values(), "REUSED"], 0)
    for trial in trials:
        # A trial that took a twin's result ran nothing: counted apart from COMPLETE.
        reused = trial.state == optuna.trial.TrialState.COMPLETE and "same_as" in trial.user_attrs
        counts["REUSED" if reused else _STATES[trial.state]] += 1
    complete = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE and "same_as" not in t.user_attrs
    ]
    best = None
    if complete:
        best = trial_view(
            max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
        )
    return StudyView(
        study_id=study_id,
        record=record,
        counts=counts,
        best_trial=best,
        excluded_note=excluded_note(record.excluded_classes or []),
    )


def read_evaluation(trial_dir: Path) -> dict[str, Any] | None:
    """The trial's evaluation document (its best epoch's once complete), when it has one."""
    path = trial_dir / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def excluded_note(excluded: Sequence[Mapping[str, Any]]) -> str:
    """How the objective treats the classes not trained on, in words ("" for none)."""
    if not excluded:
        return ""
    rows = sum(int(c["validation_rows"]) for c in excluded)
    shown = ", ".join(
        f"{excerpt(str(c['label']), 40)} ({c['train_rows']} train / {c['validation_rows']} "
        "validation rows)"
        for c in excluded[:10]
    )
    more = f" and {len(excluded) - 10} more" if len(excluded) > 10 else ""
    classes = f"{len(excluded)} class" if len(excluded) == 1 else f"{len(excluded)} classes"
    head = (
        f"{classes} not trained on (under MIN_SAMPLES_PER_CLASS training rows, "
        f"or none): {shown}{more}."
    )
    if rows == 0:
        return f"{head} They have no validation rows, so the evaluation does not score them."
    return (
        f"{head} Their {rows} validation rows stay in the evaluation and "
        "count as misses, so f1_macro includes each such class at F1 0."
    )
