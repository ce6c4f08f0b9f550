"""Ensembles of classification adapters: what a trial leaves for one, and what one is on disk.

A classification trial saves, beside each epoch's adapter, its validation rows' class
log-probabilities (`validation_scores.safetensors`: one float16 matrix `log_probs`, rows in
the validation split's order, columns in the adapter's label order, after the post-hoc
logit adjustment the predictions were made with). When the study ends, the optimizer
averages the log-probabilities of a few trials' kept epochs (core/report.py says which)
and, when the average predicts validation better, publishes the ensemble: a folder with
`ensemble.json` and one sub-folder per member, each a complete adapter folder.
`load_adapter_for_inference` in the trainer reloads such a folder as one model, which
predicts the argmax of its members' mean log-probabilities, as validation scored it.

This module is shared by the trainer (writing the scores, reading ensembles) and the
optimizer (reading the scores, writing ensembles); it needs numpy and safetensors only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENSEMBLE_FILE",
    "MAX_SCORE_CELLS",
    "SCORES_KEY",
    "VALIDATION_SCORES_FILE",
    "EnsembleManifest",
    "mean_log_probs",
    "read_manifest",
    "read_validation_scores",
    "write_manifest",
]

VALIDATION_SCORES_FILE = "validation_scores.safetensors"
SCORES_KEY = "log_probs"
ENSEMBLE_FILE = "ensemble.json"
# The largest score matrix a trial keeps (rows x classes; 8 MB in float16): 20,000 rows of
# 200 classes. Beyond it no scores are saved and the study publishes single trials.
MAX_SCORE_CELLS = 4_000_000
# How members combine: the mean of their log-probabilities (a geometric mean of the
# probabilities), the argmax of which is the prediction.
COMBINE_MEAN_LOG_PROBS = "mean_log_probs"
_MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class EnsembleManifest:
    """`ensemble.json`: the member folders (relative to the ensemble's) and the rule."""

    members: tuple[str, ...]
    combine: str = COMBINE_MEAN_LOG_PROBS
    trials: tuple[int, ...] = ()  # the study's trial numbers of the members, when known

    def to_json(self) -> dict[str, object]:
        """The manifest as written."""
        return {"combine": self.combine, "members": list(self.members), "trials": list(self.trials)}


def write_manifest(folder: Path, manifest: EnsembleManifest) -> Path:
    """Writes `ensemble.json` into `folder`."""
    path = folder / ENSEMBLE_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> EnsembleManifest | None:
    """The ensemble manifest in `folder`; None when the folder holds a single adapter.

    Raises ValueError when the manifest is unreadable, names no member, names a member
    that is not a plain sub-folder name, or combines in a way this version does not know.
    """
    path = folder / ENSEMBLE_FILE
    if not path.is_file():
        return None
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"{ENSEMBLE_FILE} is not an object")
    members = content.get("members")
    if not isinstance(members, list) or not members:
        raise ValueError(f"{ENSEMBLE_FILE} names no member")
    for member in members:
        if not isinstance(member, str) or not _MEMBER_NAME.match(member):
            raise ValueError(f"{ENSEMBLE_FILE}: a member must be a sub-folder's name")
    combine = content.get("combine", COMBINE_MEAN_LOG_PROBS)
    if combine != COMBINE_MEAN_LOG_PROBS:
        raise ValueError(f"{ENSEMBLE_FILE}: unknown combination {str(combine)[:40]!r}")
    trials = tuple(int(t) for t in content.get("trials", ()) if isinstance(t, int))
    return EnsembleManifest(members=tuple(members), combine=combine, trials=trials)


def read_validation_scores(folder: Path) -> np.ndarray | None:
    """The (rows, classes) float32 log-probabilities a trial saved in `folder`, or None."""
    path = folder / VALIDATION_SCORES_FILE
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    try:
        scores = load_file(str(path)).get(SCORES_KEY)
    except (OSError, ValueError, RuntimeError):
        return None
    if scores is None or scores.ndim != 2:
        return None
    return scores.astype(np.float32)


def mean_log_probs(scores: Sequence[np.ndarray]) -> np.ndarray:
    """The members' mean log-probabilities (all of one shape)."""
    if not scores:
        raise ValueError("no member scores")
    shape = scores[0].shape
    if any(s.shape != shape for s in scores):
        raise ValueError("member scores differ in shape")
    return np.asarray(np.stack(scores).mean(axis=0), dtype=np.float32)
