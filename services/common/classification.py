"""Classification metrics: accuracy, F1 (macro / micro / weighted), per-class P/R/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

WORST_CLASSES = 5


@dataclass(frozen=True)
class ClassScore:
    """Precision, recall, F1 and support of one label."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationReport:
    """Everything a classification evaluation reports.

    Zero division gives 0: a label never predicted has precision 0, a label without
    reference rows has recall 0, and F1 is 0 when precision and recall are both 0.
    The averages (macro, weighted) run over the labels that occur in the references
    or the predictions, as scikit-learn's defaults do; labels only listed in the label
    set still get a row and a confusion-matrix line, but do not drag the averages down.
    """

    accuracy: float
    f1_macro: float
    f1_micro: float
    f1_weighted: float
    precision_macro: float
    recall_macro: float
    per_class: tuple[ClassScore, ...]
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]
    worst_classes: tuple[str, ...]


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_report(
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] = (),
) -> ClassificationReport:
    """Scores predicted labels against reference labels.

    `labels` is the full label set (so classes never predicted nor present still get a
    row); labels seen in `predictions` or `references` are added to it. Rows are sorted
    by label. The caller validates lengths; here they must already be equal and non-empty.
    """
    if len(predictions) != len(references) or not references:
        raise ValueError("predictions and references must be non-empty and of equal length")
    all_labels = sorted(set(labels) | set(references) | set(predictions))
    index = {label: i for i, label in enumerate(all_labels)}
    n = len(all_labels)
    truth = np.fromiter((index[r] for r in references), dtype=np.int64, count=len(references))
    guess = np.fromiter((index[p] for p in predictions), dtype=np.int64, count=len(predictions))

    confusion = np.bincount(truth * n + guess, minlength=n * n).reshape(n, n)
    true_pos = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)

    precision = _safe_divide(true_pos, predicted)
    recall = _safe_divide(true_pos, support)
    # 2tp / (2tp + fp + fn) is F1 without the 0/0 of 2pr / (p + r).
    f1 = _safe_divide(2.0 * true_pos, support + predicted)

    seen = (support > 0) | (predicted > 0)
    total = float(len(references))
    accuracy = float(true_pos.sum() / total)
    per_class = tuple(
        ClassScore(
            label=label,
            precision=float(precision[i]),
            recall=float(recall[i]),
            f1=float(f1[i]),
            support=int(support[i]),
        )
        for i, label in enumerate(all_labels)
    )
    with_support = [c for c in per_class if c.support > 0]
    worst = sorted(with_support, key=lambda c: (c.f1, -c.support, c.label))[:WORST_CLASSES]
    return ClassificationReport(
        accuracy=accuracy,
        f1_macro=float(f1[seen].mean()),
        # Single-label multiclass over every label: micro P = micro R = micro F1 = accuracy.
        f1_micro=accuracy,
        f1_weighted=float((f1 * support).sum() / total),
        precision_macro=float(precision[seen].mean()),
        recall_macro=float(recall[seen].mean()),
        per_class=per_class,
        labels=tuple(all_labels),
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        worst_classes=tuple(c.label for c in worst),
    )
