"""A trial's evaluation document and its message: the big confusion matrix copied whole."""

from __future__ import annotations

import json
import time
from pathlib import Path

from google.protobuf import json_format

from loratune.common.v1 import common_pb2
from services.optimizer.api.convert import evaluation_document, evaluation_to_proto


def _result(classes: int) -> common_pb2.EvaluationResult:
    labels = [f"code-{i:03d}" for i in range(classes)]
    counts = [(i * 7919) % 13 for i in range(classes * classes)]
    return common_pb2.EvaluationResult(
        task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
        objective=0.8,
        objective_name="f1_macro",
        classification=common_pb2.ClassificationMetrics(
            f1_macro=0.8,
            per_class=[common_pb2.ClassMetrics(label=x, f1=0.5, support=3) for x in labels],
            confusion_matrix=common_pb2.ConfusionMatrix(labels=labels, counts=counts),
            worst_classes=labels[:5],
        ),
    )


def test_the_document_and_the_message_are_json_formats_own() -> None:
    result = _result(12)
    document = evaluation_document(result)
    assert document == json_format.MessageToDict(result)
    assert evaluation_to_proto(document) == result
    # The field names a document written by another version may carry work too.
    snake = json_format.MessageToDict(result, preserving_proto_field_name=True)
    assert evaluation_to_proto(snake) == result


def test_the_basic_view_leaves_out_what_grows_with_the_classes() -> None:
    result = _result(12)
    lean = evaluation_to_proto(evaluation_document(result), detail=False)
    assert not lean.classification.HasField("confusion_matrix")
    assert not lean.classification.per_class
    assert lean.classification.f1_macro == 0.8 and lean.objective == 0.8
    assert list(lean.classification.worst_classes) == list(result.classification.worst_classes)


def test_a_300_class_matrix_converts_in_milliseconds() -> None:
    result = _result(300)
    started = time.perf_counter()
    message = evaluation_to_proto(evaluation_document(result))
    seconds = time.perf_counter() - started
    assert message == result
    assert seconds < 0.5  # json_format alone took over 2 s here (two passes of 90,000 values)


def test_a_trial_keeps_its_matrix_once_and_compactly(tmp_path: Path) -> None:
    from services.optimizer.api.convert import evaluation_from_proto
    from services.optimizer.core.results import CURVE_FILE, EpochResult, record_epoch
    from services.optimizer.core.views import EVALUATION_FILE

    evaluation = evaluation_from_proto(_result(300))
    epochs = [EpochResult(i, float(i), 1.0, "", evaluation) for i in (1, 2, 3)]
    for n in range(1, 4):
        record_epoch(tmp_path, epochs[:n])
    kept = (tmp_path / EVALUATION_FILE).read_text()
    assert json.loads(kept) == evaluation.document  # what is read back is the whole result
    assert len(kept) < 400_000  # 1 MB with one count a line
    curve = json.loads((tmp_path / CURVE_FILE).read_text())
    assert len(curve["epochs"]) == 3
    for epoch in curve["epochs"]:
        assert "confusionMatrix" not in epoch["evaluation"]["classification"]
        assert len(epoch["evaluation"]["classification"]["perClass"]) == 300
    assert (tmp_path / CURVE_FILE).stat().st_size < 300_000
