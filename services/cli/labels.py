"""Short labels of studies and trials, shared by the terminal (CLI) and the web console.

Only the optimizer's messages and the standard library: the console imports this module
without pulling in typer or rich.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loratune.optimizer.v1 import optimizer_pb2

__all__ = ["modules_label", "study_state", "trial_note", "trial_state"]

# What the optimizer sent for "attention" before the trainer resolved it (stored trials).
_OLD_ATTENTION_MODULES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("query", "key", "value"))


def _state(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def trial_state(value: int) -> str:
    """COMPLETE, PRUNED, FAIL, RUNNING or WAITING."""
    return _state(value, optimizer_pb2.TrialState, "TRIAL_STATE_")


def study_state(value: int) -> str:
    """QUEUED, RUNNING, COMPLETED, CANCELLED or FAILED."""
    return _state(value, optimizer_pb2.StudyState, "STUDY_STATE_")


def modules_label(modules: Sequence[str]) -> str:
    """'all-linear', 'attention', or the module names."""
    if not modules:
        return "all-linear"
    if tuple(modules) in _OLD_ATTENTION_MODULES:
        return "attention"
    return ",".join(modules)


def trial_note(trial: optimizer_pb2.Trial) -> str:
    """Which epoch a trial kept, why it failed, and why it ran more than once."""
    parts = []
    if 0 < trial.best_epoch < len(trial.epoch_objectives):
        parts.append(f"kept epoch {trial.best_epoch} of {len(trial.epoch_objectives)}")
    if trial.failure_reason:
        parts.append(trial.failure_reason)
    if trial.attempt > 1:
        parts.append(f"attempt {trial.attempt}")
    if trial.interruptions:
        parts.append(f"re-run after: {trial.interruptions[-1]}")
    return "; ".join(parts)
