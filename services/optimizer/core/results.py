"""Trial and study results on disk: evaluation_results.json, TensorBoard scalars, the best model."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from loratune.common.v1 import common_pb2

logger = logging.getLogger(__name__)

CURVE_FILE = "evaluation_curve.json"
EPOCHS_DIR = "epochs"  # the trainer's `<output_dir>/epochs/epoch-<n>/`

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
    tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_evaluation(trial_dir: Path, result: common_pb2.EvaluationResult, step: int) -> None:
    """evaluation_results.json (the full result) and eval/* TensorBoard scalars at `step`."""
    _write_json(trial_dir / "evaluation_results.json", json_format.MessageToDict(result))
    scalars = {"eval/objective": result.objective}
    if result.HasField("classification"):
        scalars["eval/f1_macro"] = result.classification.f1_macro
        scalars["eval/f1_micro"] = result.classification.f1_micro
        scalars["eval/accuracy"] = result.classification.accuracy
    if result.HasField("bertscore"):
        scalars["eval/bertscore_f1"] = result.bertscore.f1
        scalars["eval/combined"] = result.combined_score
    if result.HasField("judge"):
        scalars["eval/judge_mean"] = result.judge.mean_score
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the optimizer image may ship without torch
        return
    writer = SummaryWriter(str(trial_dir / "logs" / "evaluation"))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()


@dataclass(frozen=True)
class EpochResult:
    """One evaluated epoch of a trial: its scores and where its adapter was saved."""

    index: int  # 1-based, the step reported to the pruner
    epoch: float
    eval_loss: float
    adapter_dir: str  # "" when the trainer saved none for this epoch
    result: common_pb2.EvaluationResult

    def record(self) -> dict[str, Any]:
        """A small JSON-ready summary (the trial's curve in storage)."""
        record: dict[str, Any] = {
            "epoch": self.index,
            "objective": self.result.objective,
            "eval_loss": self.eval_loss,
        }
        if self.result.HasField("classification"):
            c = self.result.classification
            record.update(f1_macro=c.f1_macro, f1_micro=c.f1_micro, accuracy=c.accuracy)
        if self.result.HasField("bertscore"):
            record.update(bertscore_f1=self.result.bertscore.f1)
            record.update(combined=self.result.combined_score)
        if self.result.HasField("judge"):
            record.update(judge_mean=self.result.judge.mean_score)
        return record


def best_epoch(epochs: Sequence[EpochResult]) -> EpochResult:
    """The epoch with the highest objective; the earliest of equals (less training)."""
    if not epochs:
        raise ValueError("no evaluated epoch")
    best = epochs[0]
    for epoch in epochs[1:]:
        if epoch.result.objective > best.result.objective:
            best = epoch
    return best


def write_curve(trial_dir: Path, epochs: Sequence[EpochResult]) -> None:
    """evaluation_curve.json: every epoch's full evaluation, in order."""
    _write_json(
        trial_dir / CURVE_FILE,
        {
            "epochs": [
                {**e.record(), "evaluation": json_format.MessageToDict(e.result)} for e in epochs
            ]
        },
    )


def keep_epoch(trial_dir: Path, best: EpochResult) -> None:
    """Makes the trial's folder hold `best`'s adapter and evaluation (see keep_adapter)."""
    keep_adapter(trial_dir, best.adapter_dir)
    _write_json(trial_dir / "evaluation_results.json", json_format.MessageToDict(best.result))


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


def read_evaluation(trial_dir: Path) -> common_pb2.EvaluationResult | None:
    """The trial's last evaluation, when it has one."""
    path = trial_dir / "evaluation_results.json"
    if not path.is_file():
        return None
    return json_format.ParseDict(
        json.loads(path.read_text(encoding="utf-8")), common_pb2.EvaluationResult()
    )


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


def write_study_summary(target_dir: Path, summary: Mapping[str, Any]) -> Path:
    """study.json beside the published model."""
    path = target_dir / "study.json"
    _write_json(path, dict(summary))
    return path
