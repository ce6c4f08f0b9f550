"""Trial and study results on disk: evaluation_results.json, TensorBoard scalars, the best model."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from loratune.common.v1 import common_pb2

logger = logging.getLogger(__name__)

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
