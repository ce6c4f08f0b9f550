"""Rich tables of evaluation results for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from loratune.common.v1 import common_pb2

MAX_CLASS_ROWS = 40


def render_evaluation(console: Console, result: common_pb2.EvaluationResult) -> None:
    """Prints a summary table, and per-class rows for classification."""
    summary = Table(title="Evaluation", show_header=True)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    if result.task_type == common_pb2.TASK_TYPE_CLASSIFICATION:
        cls = result.classification
        for name, value in (
            ("accuracy", cls.accuracy),
            ("F1 macro", cls.f1_macro),
            ("F1 micro", cls.f1_micro),
            ("F1 weighted", cls.f1_weighted),
        ):
            summary.add_row(name, f"{value:.4f}")
        summary.add_row("worst classes", ", ".join(cls.worst_classes))
    else:
        bert = result.bertscore
        summary.add_row(
            "BERTScore P / R / F1", f"{bert.precision:.4f} / {bert.recall:.4f} / {bert.f1:.4f}"
        )
        summary.add_row("BERTScore model", f"{bert.model} (layer {bert.num_layers})")
        summary.add_row("empty / truncated texts", f"{bert.empty_texts} / {bert.truncated_texts}")
        if result.HasField("judge"):
            judge = result.judge
            summary.add_row(
                f"LLM judge ({judge.judge_model_id or 'default'})",
                f"{judge.mean_score:.2f} on {judge.judged}/{judge.requested}",
            )
        summary.add_row("combined", f"{result.combined_score:.4f}")
    summary.add_row(f"objective ({result.objective_name})", f"{result.objective:.4f}")
    summary.add_row("examples", str(result.num_examples))
    console.print(summary)

    if result.task_type == common_pb2.TASK_TYPE_CLASSIFICATION:
        per_class = Table(title="Per class (worst F1 first)")
        for column in ("label", "precision", "recall", "F1", "support"):
            per_class.add_column(column, justify="left" if column == "label" else "right")
        rows = sorted(result.classification.per_class, key=lambda c: (c.f1, -c.support))
        for c in rows[:MAX_CLASS_ROWS]:
            per_class.add_row(
                c.label, f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", str(c.support)
            )
        if len(rows) > MAX_CLASS_ROWS:
            per_class.caption = f"{len(rows) - MAX_CLASS_ROWS} more classes in the JSON output"
        console.print(per_class)
