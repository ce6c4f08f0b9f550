"""Prometheus metrics of the optimizer.

Labels are bounded: states, reasons and objective names come from fixed sets; the only
id used as a label is a study's, on gauges that exist while the study runs and are
removed when it ends (``forget_study``), so their number is that of the studies alive.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

STUDIES = Gauge("loratune_optimizer_studies", "Studies by state.", ["state"])
# complete, pruned, fail (a trial told FAIL), cancelled (ended with its study) and reused (a
# trial that took a finished twin's result: same result-deciding parameters, no job).
TRIAL_STATES = ("complete", "pruned", "fail", "cancelled", "reused")
TRIALS = Counter(
    "loratune_optimizer_trials_total",
    "Trials ended, by state (complete, pruned, fail, cancelled, reused).",
    ["state"],
)
# Why a trial was told FAIL: the trainer's failure reasons and the optimizer's own.
FAILURE_REASONS = (
    "out_of_memory",
    "oom_skipped",
    "invalid_input",
    "internal",
    "nan_loss",
    "evaluation",
    "trainer_refused",
    "no_evaluation",
    "interrupted_too_often",
    "other",
)
TRIAL_FAILURES = Counter(
    "loratune_optimizer_trial_failures_total",
    "Trials told FAIL, by reason (a fixed set; cancelled studies' trials are not failures).",
    ["reason"],
)
TRIAL_DURATION = Histogram(
    "loratune_optimizer_trial_duration_seconds",
    "Wall time of a trial from dispatch to its end.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
)
TRAINERS = Gauge("loratune_optimizer_trainers", "Trainers by state.", ["state"])
DISPATCH_ERRORS = Counter(
    "loratune_optimizer_dispatch_errors_total", "Failed dispatches, by reason.", ["reason"]
)
EVALUATION_RETRIES = Counter(
    "loratune_optimizer_evaluation_retries_total",
    "Evaluations retried after a refusal as unavailable (the evaluator or the judge away, "
    "or too little of the judge's sample judged).",
)
# Why a trial runs again: its trainer shut down (drain, preemption), was lost (restart,
# crash, broken stream), was busy or unreachable when the trial was dispatched.
INTERRUPTION_REASONS = ("trainer_shutdown", "trainer_lost", "trainer_busy", "trainer_unavailable")
TRIAL_INTERRUPTIONS = Counter(
    "loratune_optimizer_trial_interruptions_total",
    "Trials run again through no fault of their own (re-runs), by reason.",
    ["reason"],
)
# The objectives a study can have (StudySpec.objective_name).
OBJECTIVES = ("f1_macro", "combined")
TRIAL_OBJECTIVE = Histogram(
    "loratune_optimizer_trial_objective",
    "Objective of each COMPLETE trial (its best epoch's), by objective name.",
    ["objective"],
    buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)),
)
STUDY_BEST_OBJECTIVE = Gauge(
    "loratune_optimizer_study_best_objective",
    "Best objective so far of each running study (removed when the study ends).",
    ["study", "objective"],
)
STUDY_LAST_TRIAL_END = Gauge(
    "loratune_optimizer_study_last_trial_end_timestamp_seconds",
    "Unix time a trial of each running study last ended (its start before any did; "
    "removed when the study ends).",
    ["study"],
)
TRIALS_RUNNING = Gauge("loratune_optimizer_trials_running", "Trials running on a trainer now.")
TRIALS_WAITING = Gauge(
    "loratune_optimizer_trials_waiting",
    "Trials the running studies would start now but have no idle trainer for.",
)

for _state in TRIAL_STATES:
    TRIALS.labels(state=_state)
for _reason in FAILURE_REASONS:
    TRIAL_FAILURES.labels(reason=_reason)
for _reason in INTERRUPTION_REASONS:
    TRIAL_INTERRUPTIONS.labels(reason=_reason)
for _objective in OBJECTIVES:
    TRIAL_OBJECTIVE.labels(objective=_objective)
for _reason in ("busy", "unavailable", "invalid", "error", "trainer_lost"):
    DISPATCH_ERRORS.labels(reason=_reason)
for _state in ("idle", "busy", "unreachable"):
    TRAINERS.labels(state=_state)


# Studies whose per-study gauges may be set: running ones (a late trial of an ended study
# must not bring its gauges back).
_live_studies: set[str] = set()


def objective_label(name: str) -> str:
    """``name`` when it is a known objective, else ``other`` (labels stay bounded)."""
    return name if name in OBJECTIVES else "other"


def failure_label(reason: str) -> str:
    """``reason`` when it is a known failure reason, else ``other``."""
    return reason if reason in FAILURE_REASONS else "other"


def forget_study(study_id: str) -> None:
    """Removes the per-study gauges of a study that ended (no-op for those never set)."""
    _live_studies.discard(study_id)
    for objective in (*OBJECTIVES, "other"):
        with contextlib.suppress(KeyError):
            STUDY_BEST_OBJECTIVE.remove(study_id, objective)
    with contextlib.suppress(KeyError):
        STUDY_LAST_TRIAL_END.remove(study_id)


def study_running(study_id: str, best: float | None = None, objective: str = "") -> None:
    """A study runs (started, or resumed): its per-study gauges exist from now on."""
    _live_studies.add(study_id)
    STUDY_LAST_TRIAL_END.labels(study=study_id).set_to_current_time()
    if best is not None:
        STUDY_BEST_OBJECTIVE.labels(study=study_id, objective=objective_label(objective)).set(best)


def trial_ended(study_id: str) -> None:
    """A trial of the study ended (told): its last-trial-end time is now."""
    if study_id in _live_studies:
        STUDY_LAST_TRIAL_END.labels(study=study_id).set_to_current_time()


def trial_completed(study_id: str, objective: str, value: float, best: float) -> None:
    """A trial completed with ``value``; ``best`` is the study's best value now."""
    label = objective_label(objective)
    TRIAL_OBJECTIVE.labels(objective=label).observe(value)
    if study_id in _live_studies:
        STUDY_BEST_OBJECTIVE.labels(study=study_id, objective=label).set(best)
