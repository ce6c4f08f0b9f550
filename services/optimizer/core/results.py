"""Trial and study results on disk: evaluation_results.json, TensorBoard scalars, the best model."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.ensembles import EnsembleManifest, write_manifest
from services.optimizer.core.ports import Evaluation
from services.optimizer.core.views import EVALUATION_FILE

logger = logging.getLogger(__name__)

CURVE_FILE = "evaluation_curve.json"
EPOCHS_DIR = "epochs"  # the trainer's `<output_dir>/epochs/epoch-<n>/`
# A classification trial's validation predictions per evaluated epoch (label indices), read
# back when the study ends to measure the noise of its selection (core/report.py).
PREDICTIONS_DIR = "validation_predictions"

PUBLISHED_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "training_config.json",
    "evaluation_results.json",
    "class_weights.json",
)


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(evaluation_json(content) + "\n", encoding="utf-8")
    tmp.replace(path)


def evaluation_json(content: Any) -> str:
    """Indented JSON, with a classification's confusion counts on one line (one number a
    line made a 300-class evaluation 1 MB, 90,000 lines)."""
    matrix = _matrix(content)
    if matrix is None or not isinstance(matrix.get("counts"), list):
        return json.dumps(content, indent=2, ensure_ascii=False)
    counts = matrix["counts"]
    marker = "@@confusion-counts@@"
    matrix["counts"] = marker
    try:
        text = json.dumps(content, indent=2, ensure_ascii=False)
    finally:
        matrix["counts"] = counts
    return text.replace(json.dumps(marker), json.dumps(counts, separators=(",", ":")), 1)


def _matrix(document: Any) -> dict[str, Any] | None:
    """The confusion matrix of an evaluation document, or None."""
    if not isinstance(document, dict):
        return None
    classification = document.get("classification")
    if not isinstance(classification, dict):
        return None
    matrix = classification.get("confusionMatrix", classification.get("confusion_matrix"))
    return matrix if isinstance(matrix, dict) else None


def _without_matrix(document: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation document without its confusion matrix (the curve's copy of each epoch:
    the kept epoch's matrix is in evaluation_results.json)."""
    content = dict(document)
    classification = content.get("classification")
    if isinstance(classification, Mapping):
        content["classification"] = {
            k: v
            for k, v in classification.items()
            if k not in ("confusionMatrix", "confusion_matrix")
        }
    return content


def write_evaluation(trial_dir: Path, evaluation: Evaluation, step: int) -> None:
    """evaluation_results.json (the full result) and eval/* TensorBoard scalars at `step`."""
    _write_json(trial_dir / EVALUATION_FILE, dict(evaluation.document))
    scalars = {"eval/objective": evaluation.objective}
    scalars |= {f"eval/{name}": value for name, value in evaluation.figures.items()}
    write_scalars(trial_dir / "logs" / "evaluation", scalars, step)


# The optimizer's TensorBoard event file in a trial's logs/evaluation/ (appended to at each
# epoch; TensorBoard reads every file whose name holds "tfevents").
EVENTS_FILE = "events.out.tfevents.0.loratune-optimizer"


def write_scalars(folder: Path, scalars: Mapping[str, float], step: int) -> None:
    """Appends `scalars` at `step` to the folder's TensorBoard event file, written with
    TensorBoard's own record format and protos: no torch and no writer thread in the
    optimizer (torch's SummaryWriter cost 0.7 s and 200 MB of memory per evaluation)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:  # the optimizer image may ship without tensorboard
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EVENTS_FILE
    now = time.time()
    events = [] if path.exists() else [Event(wall_time=now, file_version="brain.Event:2")]
    values = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
    events.append(Event(wall_time=now, step=step, summary=Summary(value=values)))
    with path.open("ab") as out:
        writer = RecordWriter(out)
        for event in events:
            writer.write(event.SerializeToString())


@dataclass(frozen=True)
class EpochResult:
    """One evaluated epoch of a trial: its scores and where its adapter was saved."""

    index: int  # 1-based, the step reported to the pruner
    epoch: float
    eval_loss: float
    adapter_dir: str  # "" when the trainer saved none for this epoch
    evaluation: Evaluation
    # Attempts at this evaluation refused as UNAVAILABLE before it was scored, the last's reason.
    refusals: int = 0
    last_refusal: str = ""

    def record(self) -> dict[str, Any]:
        """A small JSON-ready summary (the trial's curve in storage).

        With the judge: `judge_judged` / `judge_requested`, the coverage of its sample; with
        refused attempts before the score: `refusals` and `last_refusal`.
        """
        content: dict[str, Any] = {
            "epoch": self.index,
            "objective": self.evaluation.objective,
            "eval_loss": self.eval_loss,
            **self.evaluation.figures,
        }
        judge = self.evaluation.document.get("judge")
        if isinstance(judge, Mapping):
            # protobuf's JSON leaves zeros out: a judge that judged nothing has no `judged`.
            content["judge_judged"] = int(judge.get("judged", 0))
            content["judge_requested"] = int(judge.get("requested", 0))
        if self.refusals:
            content["refusals"] = self.refusals
            content["last_refusal"] = self.last_refusal
        return content


def best_epoch(epochs: Sequence[EpochResult]) -> EpochResult:
    """The epoch with the highest objective; the earliest of equals (less training)."""
    if not epochs:
        raise ValueError("no evaluated epoch")
    best = epochs[0]
    for epoch in epochs[1:]:
        if epoch.evaluation.objective > best.evaluation.objective:
            best = epoch
    return best


def record_epoch(trial_dir: Path, epochs: Sequence[EpochResult]) -> None:
    """After each epoch: its evaluation as the trial's latest, and the whole curve so far."""
    write_evaluation(trial_dir, epochs[-1].evaluation, epochs[-1].index)
    _write_json(
        trial_dir / CURVE_FILE,
        {
            "epochs": [
                {**e.record(), "evaluation": _without_matrix(e.evaluation.document)} for e in epochs
            ]
        },
    )


def record_predictions(
    trial_dir: Path,
    index: int,
    labels: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
) -> None:
    """`validation_predictions/epoch-<index>.json`: the epoch's predictions and references
    as indices into `labels` (-1: a prediction outside them)."""
    position = {label: i for i, label in enumerate(labels)}
    _write_json(
        trial_dir / PREDICTIONS_DIR / f"epoch-{index}.json",
        {
            "labels": list(labels),
            "predictions": [position.get(p, -1) for p in predictions],
            "references": [position.get(r, -1) for r in references],
        },
    )


def read_predictions(trial_dir: Path, index: int) -> tuple[list[int], list[int]] | None:
    """(predictions, references) recorded for an epoch, or None when there are none."""
    path = trial_dir / PREDICTIONS_DIR / f"epoch-{index}.json"
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        return [int(p) for p in content["predictions"]], [int(r) for r in content["references"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def keep_epoch(trial_dir: Path, best: EpochResult) -> None:
    """Makes the trial's folder hold `best`'s adapter and evaluation (see keep_adapter)."""
    keep_adapter(trial_dir, best.adapter_dir)
    _write_json(trial_dir / EVALUATION_FILE, dict(best.evaluation.document))


def keep_adapter(job_dir: Path, adapter_dir: str) -> None:
    """Makes `job_dir` hold the adapter saved in `adapter_dir`; drops the other epochs'.

    The trainer saves the last epoch's adapter in the job's folder and earlier epochs'
    under `epochs/epoch-<n>/`; when an earlier epoch is kept, its files replace the last
    one's. The `epochs/` folder goes either way (each epoch's scores stay on record).
    """
    source = Path(adapter_dir) if adapter_dir else None
    if source is not None and source.is_dir() and source.resolve() != job_dir.resolve():
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, job_dir / path.name)
    epochs_dir = job_dir / EPOCHS_DIR
    if epochs_dir.is_dir():
        shutil.rmtree(epochs_dir, ignore_errors=True)


def publish_best(trial_dir: Path, models_root: Path, run_name: str) -> Path:
    """Copies the best trial's adapter and records to `<models_root>/<run_name>/`."""
    target = models_root / run_name
    staging = models_root / f".{run_name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in trial_dir.iterdir():
        # The adapter, its configs and records, and the tokenizer's files; not the logs.
        if path.is_file():
            shutil.copy2(path, staging / path.name)
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    return target


def publish_ensemble(members: Sequence[tuple[int, Path]], models_root: Path, run_name: str) -> Path:
    """Publishes an ensemble to `<models_root>/<run_name>/`: `ensemble.json` and one
    `trial-<n>/` folder per member (its adapter and records, as publish_best copies them),
    in the given order (the best member first)."""
    target = models_root / run_name
    staging = models_root / f".{run_name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    names = []
    for number, source in members:
        name = f"trial-{number}"
        (staging / name).mkdir()
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / name / path.name)
        names.append(name)
    write_manifest(
        staging, EnsembleManifest(members=tuple(names), trials=tuple(n for n, _ in members))
    )
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    return target


def write_study_summary(target_dir: Path, summary: Mapping[str, Any]) -> Path:
    """study.json beside the published model."""
    path = target_dir / "study.json"
    _write_json(path, dict(summary))
    return path
