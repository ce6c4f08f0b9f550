"""Prometheus metrics of the optimizer (no study or trial ids as labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STUDIES = Gauge("loratune_optimizer_studies", "Studies by state.", ["state"])
TRIALS = Counter("loratune_optimizer_trials_total", "Trials finished, by state.", ["state"])
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
TRIAL_INTERRUPTIONS = Counter(
    "loratune_optimizer_trial_interruptions_total",
    "Trials run again through no fault of their own (trainer stopped or lost, restart).",
)
