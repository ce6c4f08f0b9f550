"""Classification metrics equal scikit-learn's on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from services.common.classification import classification_report

LABELS = ["acc-1010", "acc-2020", "счёт-62", "налог-68", "z", "rare"]


@st.composite
def labelled(draw: st.DrawFn) -> tuple[list[str], list[str], list[str]]:
    n = draw(st.integers(min_value=1, max_value=60))
    pool = draw(st.lists(st.sampled_from(LABELS), min_size=1, max_size=len(LABELS), unique=True))
    refs = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    preds = draw(st.lists(st.sampled_from(LABELS), min_size=n, max_size=n))
    extra = draw(st.lists(st.sampled_from(LABELS), max_size=3, unique=True))
    return preds, refs, extra


@settings(max_examples=200, deadline=None)
@given(labelled())
def test_equals_sklearn(case: tuple[list[str], list[str], list[str]]) -> None:
    preds, refs, extra = case
    report = classification_report(preds, refs, extra)
    every = sorted(set(preds) | set(refs) | set(extra))
    assert list(report.labels) == every

    assert report.accuracy == pytest.approx(accuracy_score(refs, preds), abs=1e-12)
    for average, value in (
        ("macro", report.f1_macro),
        ("micro", report.f1_micro),
        ("weighted", report.f1_weighted),
    ):
        assert value == pytest.approx(
            f1_score(refs, preds, average=average, zero_division=0), abs=1e-12
        ), average
    assert report.precision_macro == pytest.approx(
        precision_score(refs, preds, average="macro", zero_division=0), abs=1e-12
    )
    assert report.recall_macro == pytest.approx(
        recall_score(refs, preds, average="macro", zero_division=0), abs=1e-12
    )

    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=every, zero_division=0)
    assert [c.label for c in report.per_class] == every
    assert np.allclose([c.precision for c in report.per_class], p, atol=1e-12)
    assert np.allclose([c.recall for c in report.per_class], r, atol=1e-12)
    assert np.allclose([c.f1 for c in report.per_class], f, atol=1e-12)
    assert [c.support for c in report.per_class] == list(s)
    assert np.array_equal(np.array(report.confusion), confusion_matrix(refs, preds, labels=every))


def test_label_never_seen_gets_a_zero_row_and_keeps_the_average() -> None:
    report = classification_report(["a", "b", "a"], ["a", "b", "b"], labels=["a", "b", "c"])
    row = {c.label: c for c in report.per_class}["c"]
    assert (row.precision, row.recall, row.f1, row.support) == (0.0, 0.0, 0.0, 0)
    assert report.f1_macro == pytest.approx(
        f1_score(["a", "b", "b"], ["a", "b", "a"], average="macro")
    )


def test_worst_classes_are_the_lowest_f1_with_support() -> None:
    refs = ["head"] * 10 + ["mid"] * 4 + ["tail1", "tail2"] + ["ok"] * 3
    preds = ["head"] * 10 + ["mid", "mid", "head", "head"] + ["head", "head"] + ["ok"] * 3
    report = classification_report(preds, refs, labels=["unused"])
    assert report.worst_classes[:2] in (("tail1", "tail2"), ("tail2", "tail1"))
    assert "unused" not in report.worst_classes
    assert len(report.worst_classes) == 5
    assert report.worst_classes[2] == "mid"
