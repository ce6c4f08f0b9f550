"""`loratune prepare-data`, `train` and `evaluate-adapter`, the seed's three steps."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.main import app
from services.common.config import CommonSettings
from services.common.errors import NotFound
from services.common.server import RunningServer, ServiceDefinition, start_server
from services.evaluator.core.bertscore import packaged_minilm_path

runner = CliRunner()

ROWS = (
    [("Оплата аренды офиса за март", "20.01")] * 8
    + [("Выплата заработной платы сотрудникам", "70.00")] * 6
    + [("Уплата НДС за квартал", "68.02")] * 4
    + [("Комиссия банка", "91.02")] * 2
)


def write_csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["comment", "code"])
        for i, (text, label) in enumerate(ROWS):
            writer.writerow([f"{text} №{i}", label])
    return path


def test_prepare_data_prints_statistics_and_writes_the_split(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "payments.csv")
    out = tmp_path / "prepared"
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "--dataset",
            str(data),
            "--text-field",
            "comment",
            "--label-field",
            "code",
            "--min-samples-per-class",
            "3",
            "--output",
            str(out),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "imbalance ratio (largest / smallest class): 1.8" in result.output
    assert "91.02" in result.output  # left out, and said so
    weights = json.loads((out / "class_weights.json").read_text(encoding="utf-8"))
    assert set(weights["labels"]) == {"20.01", "70.00", "68.02"}
    train_rows = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert any("Оплата аренды" in row for row in train_rows)


def test_prepare_data_bad_field_is_a_clear_error(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "payments.csv")
    result = runner.invoke(
        app, ["prepare-data", "--dataset", str(data), "--output", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "dataset.text_field" in result.output and "comment" in result.output


def test_train_then_evaluate_adapter(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "payments.csv")
    adapter = tmp_path / "adapter"
    result = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            str(data),
            "--text-field",
            "comment",
            "--label-field",
            "code",
            "--base-model",
            packaged_minilm_path(),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.005",
            "--rank",
            "4",
            "--alpha",
            "8",
            "--max-seq-length",
            "32",
            "--output",
            str(adapter),
        ],
        env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert result.exit_code == 0, result.output
    assert "adapter saved to" in result.output
    assert (adapter / "adapter_model.safetensors").is_file()
    # The best epoch by macro-F1 is kept, and the files say which one it was.
    kept = re.search(r"kept epoch (\d) of 2 \(macro-F1 ([0-9.]+)", result.output)
    assert kept is not None, result.output
    f1_by_epoch = dict(
        re.findall(
            r"epoch (\d): eval loss [0-9.]+, accuracy [0-9.]+, macro-F1 ([0-9.]+)", result.output
        )
    )
    assert kept.group(2) == max(f1_by_epoch.values())
    config = json.loads((adapter / "training_config.json").read_text())
    assert config["result"]["epoch"] == int(kept.group(1))
    assert not (adapter / "epochs").exists()

    report = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "evaluate-adapter",
            "--adapter",
            str(adapter),
            "--dataset",
            str(data),
            "--text-field",
            "comment",
            "--label-field",
            "code",
            "--output",
            str(report),
        ],
        env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"},
    )
    assert result.exit_code == 0, result.output
    assert "F1 macro" in result.output and "Per class" in result.output
    for name in ("evaluation_results.json", "confusion_matrix.csv", "confusion_matrix.png"):
        assert (report / name).is_file(), name
    assert (report / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    with (report / "confusion_matrix.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "true \\ predicted" and len(rows) == len(rows[0])
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == len(ROWS)


def test_train_reports_bad_hyperparameters(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "payments.csv")
    result = runner.invoke(
        app,
        [
            "train",
            "--dataset",
            str(data),
            "--text-field",
            "comment",
            "--label-field",
            "code",
            "--base-model",
            packaged_minilm_path(),
            "--rank",
            "0",
            "--output",
            str(tmp_path / "x"),
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.exit_code == 2
    assert "hyperparameters.lora.rank" in result.output


class RestartedTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Accepts a job, then knows none: a trainer that restarted between the two calls."""

    async def StartTraining(
        self, request: trainer_pb2.StartTrainingRequest, context: Any
    ) -> trainer_pb2.StartTrainingResponse:
        return trainer_pb2.StartTrainingResponse(job=trainer_pb2.TrainingJob(job_id=request.job_id))

    async def WatchTraining(
        self, request: trainer_pb2.WatchTrainingRequest, context: Any
    ) -> AsyncIterator[trainer_pb2.TrainingEvent]:
        raise NotFound(f"no job '{request.job_id}' on this trainer (it may have restarted)")
        yield trainer_pb2.TrainingEvent()  # a server-streaming method


@pytest.fixture
async def restarted_trainer() -> AsyncIterator[RunningServer]:
    fake = RestartedTrainer()
    definition = ServiceDefinition(
        full_name=trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
        register=lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, s),
    )
    server = await start_server(
        [definition], CommonSettings(reflection=False), host="127.0.0.1", metrics_port=None
    )
    yield server
    await server.stop(0)


async def test_a_job_the_trainer_does_not_know_exits_2(
    tmp_path: Path, restarted_trainer: RunningServer
) -> None:
    data = write_csv(tmp_path / "payments.csv")
    args = ["train", "--dataset", str(data), "--text-field", "comment", "--label-field", "code"]
    args += ["--base-model", "base", "--output", str(tmp_path / "job")]
    # The server runs on this test's event loop: the CLI (with its own loop) runs in a thread.
    result = await asyncio.to_thread(
        runner.invoke, app, [*args, "--trainer", restarted_trainer.address]
    )
    assert result.exit_code == 2, result.output
    pattern = r"error \(NOT_FOUND\): no job 'train-[0-9a-f]{8}' on this trainer"
    assert re.search(pattern, result.output), result.output


def test_a_folder_without_an_adapter_is_refused(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "payments.csv")
    args = ["evaluate-adapter", "--adapter", str(tmp_path / "none"), "--dataset", str(data)]
    result = runner.invoke(app, [*args, "--text-field", "comment", "--label-field", "code"])
    assert result.exit_code == 2, result.output
    assert "error (INVALID_ARGUMENT): adapter_dir:" in result.output
