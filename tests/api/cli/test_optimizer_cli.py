"""`loratune up`, `demo-data`, `tune` (in-process and remote), `studies`, `trials`, `watch`,
`cancel`."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import Result
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.cli.main import app
from services.cli.stack import LocalStack, StackOptions
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.labels import model_label
from tests.unit.trainer.conftest import build_tiny_qwen

os.environ.setdefault("HF_HUB_OFFLINE", "1")

runner = CliRunner()
# Wide enough that the tables keep a row on one line; no optimizer from the environment.
ENV: dict[str, str | None] = {"COLUMNS": "200", "LORATUNE_OPTIMIZER_ADDRESS": None}
FINISHED_ROW = re.compile(r"^\s*\d+\*?\s+(COMPLETE|PRUNED)\s", re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture
def sentiment(tmp_path: Path) -> Path:
    words = ["good", "great", "bad", "awful"]
    rows = [
        {"text": f"w{i % 7} {words[i % 4]} w{i % 5}", "label": "pos" if i % 4 < 2 else "neg"}
        for i in range(24)
    ]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tune_args(dataset: Path, base_model: Path, *extra: str) -> list[str]:
    """A tiny study: 1 epoch, short sequences, learning rates that move a tiny model."""
    return [
        "tune",
        "--dataset",
        str(dataset),
        "--task",
        "classification",
        "--base-model",
        str(base_model),
        "--epochs",
        "1",
        "--ranks",
        "4,8",
        "--learning-rate",
        "1e-3,1e-2",
        "--max-seq-length",
        "32",
        "--batch-size",
        "4",
        "--validation-fraction",
        "0.25",
        *extra,
    ]


def test_demo_data_is_long_tailed(tmp_path: Path) -> None:
    out = tmp_path / "demo" / "payments.csv"
    result = runner.invoke(app, ["demo-data", "--output", str(out)], env=ENV)
    assert result.exit_code == 0, result.output
    with out.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(row["label"] for row in rows)
    top_label, top = counts.most_common(1)[0]
    assert 0.22 <= top / len(rows) <= 0.28
    rare = [n for n in counts.values() if n <= 20]
    assert len(rare) >= 5 and min(rare) >= 8
    assert any("Оплата" in row["text"] for row in rows)
    assert f"{len(rows)} rows, {len(counts)} classes; top class {top_label}" in result.output
    assert f"({top / len(rows):.1%})" in result.output
    smallest = min(counts.values())
    assert "smallest classes:" in result.output and f"({smallest})" in result.output


def test_every_command_filters_the_libraries_noise_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # bitsandbytes warns at import, before a command sets up logging.
    bitsandbytes = logging.getLogger("bitsandbytes.backends.cpu.ops")
    monkeypatch.setattr(bitsandbytes, "filters", [])
    out = tmp_path / "payments.csv"
    assert runner.invoke(app, ["demo-data", "--output", str(out)], env=ENV).exit_code == 0
    with caplog.at_level(logging.WARNING):
        bitsandbytes.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
            "sure you already `pip install kernels` and the kernels >= 0.11.1",
            "No module named 'kernels'",
        )
    assert not caplog.records


@pytest.mark.slow
def test_tune_in_process_ends_with_the_table_and_the_adapter(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path
) -> None:
    root = tmp_path / "runs"
    args = tune_args(sentiment, tiny_qwen, "--n-trials", "5", "--study-name", "cli")
    args += ["--time-budget", "2h"]  # far more than the study needs: it ends by n_trials
    result = runner.invoke(app, [*args, "--artifact-root", str(root)], env=ENV)
    assert result.exit_code == 0, result.output
    out = result.output
    # The base model's folder shortened, so that the line stays one line.
    assert f"study cli: 5 trials of {model_label(str(tiny_qwen))} within 2h (" in out
    assert "ended early" not in out
    assert "5/5 trials" in out and "best f1_macro" in out  # the progress line at its end
    assert "Trials of cli" in out
    assert len(FINISHED_ROW.findall(out)) == 5, out
    assert "study cli: COMPLETED" in out
    published = root / "models" / "cli"
    assert f"best adapter published to {published.resolve()}" in out
    assert (published / "adapter_config.json").is_file()
    assert (published / "study.json").is_file()
    assert (root / "optuna.db").is_file()  # the embedded optimizer's SQLite storage


def test_usage_errors_need_no_server(tmp_path: Path, sentiment: Path) -> None:
    result = runner.invoke(app, ["studies"], env=ENV)
    assert result.exit_code == 2
    assert "LORATUNE_OPTIMIZER_ADDRESS" in result.output
    result = runner.invoke(app, ["tune", "--dataset", str(sentiment), "--task", "summaries"])
    assert result.exit_code == 2 and "--task" in result.output
    result = runner.invoke(
        app, ["tune", "--dataset", str(sentiment), "--task", "classification", "--epochs", "x"]
    )
    assert result.exit_code == 2 and "--epochs" in result.output
    result = runner.invoke(
        app, ["tune", "--dataset", str(sentiment), "--task", "classification", "--n-trials", "0"]
    )
    assert result.exit_code == 2 and "fine_tuning_params.n_trials" in result.output
    result = runner.invoke(
        app,
        ["tune", "--dataset", str(sentiment), "--task", "classification", "--time-budget", "soon"],
    )
    assert result.exit_code == 2, result.output
    assert "--time-budget" in result.output and "such as 90m" in result.output


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    s = LocalStack(
        StackOptions(artifact_root=tmp_path / "runs"),
        CommonSettings(reflection=False, auth_token=None),
        ClientSettings(),
    )
    await s.start()
    yield s
    await s.stop(2)


async def invoke(args: list[str], **env: str) -> Result:
    # The stack serves on this test's event loop: the CLI (with its own loop) runs in a thread.
    return await asyncio.to_thread(runner.invoke, app, args, env={**ENV, **env})


async def test_client_commands_against_a_running_stack(
    stack: LocalStack, sentiment: Path, tiny_qwen: Path
) -> None:
    address = stack.optimizer_address
    result = await invoke(["studies", "--optimizer", address])
    assert result.exit_code == 0, result.output
    assert "no studies" in result.output

    # Bad input comes back with its code and field, exit 2.
    result = await invoke(
        [*tune_args(sentiment, tiny_qwen, "--n-trials", "3"), "--optimizer", address]
    )
    assert result.exit_code == 2, result.output
    assert "INVALID_ARGUMENT" in result.output
    assert "fine_tuning_params.n_trials" in result.output and "got 3" in result.output

    # A long study; once a trial has finished, look at it and cancel it.
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = optimizer_pb2_grpc.OptimizerServiceStub(channel)
        await stub.CreateStudy(
            optimizer_pb2.CreateStudyRequest(
                project_id=7,
                study_name="long",
                fine_tuning_params=optimizer_pb2.FineTuningParams(
                    base_model_name=str(tiny_qwen), n_trials=100
                ),
                dataset=common_pb2.DatasetSpec(
                    uri=str(sentiment),
                    task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                    validation_fraction=0.25,
                ),
                search_space=optimizer_pb2.SearchSpace(rank=[4], num_epochs=[1]),
                training=common_pb2.TrainingParams(batch_size=4, max_seq_length=32),
            )
        )
        async for event in stub.WatchStudy(
            optimizer_pb2.WatchStudyRequest(study_id="long"), timeout=120
        ):
            if event.WhichOneof("event") == "trial_finished":
                break

    # The address from the environment, and the project filter.
    result = await invoke(["studies", "--project-id", "7"], LORATUNE_OPTIMIZER_ADDRESS=address)
    assert result.exit_code == 0, result.output
    assert re.search(r"long\s+7\s+RUNNING\s+\d+/100", result.output), result.output
    result = await invoke(["studies", "--project-id", "8", "--optimizer", address])
    assert "no studies of project 8" in result.output

    result = await invoke(["trials", "long", "--optimizer", address])
    assert result.exit_code == 0, result.output
    assert "Trials of long" in result.output and "study long: RUNNING" in result.output
    assert FINISHED_ROW.search(result.output), result.output

    result = await invoke(["cancel", "long", "--optimizer", address])
    assert result.exit_code == 0, result.output
    assert "study long: CANCELLED" in result.output
    result = await invoke(["cancel", "long", "--optimizer", address])
    assert result.exit_code == 2
    assert "FAILED_PRECONDITION" in result.output and "already cancelled" in result.output

    # Watching a finished study shows its end at once; not COMPLETED, so exit 1.
    result = await invoke(["watch", "long", "--optimizer", address])
    assert result.exit_code == 1, result.output
    assert "study long: CANCELLED" in result.output and "cancelled by a client" in result.output

    result = await invoke(["trials", "missing", "--optimizer", address])
    assert result.exit_code == 2
    assert "error (NOT_FOUND): no study 'missing'" in result.output
    result = await invoke(["watch", "missing", "--optimizer", address])
    assert result.exit_code == 2
    assert "error (NOT_FOUND): no study 'missing'" in result.output


def test_an_optimizer_that_cannot_be_reached_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
    result = runner.invoke(app, ["studies", "--optimizer", address], env=ENV)
    assert result.exit_code == 1, result.output
    assert "error (UNAVAILABLE)" in result.output


async def test_up_prints_the_addresses_and_stops_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        optimizer = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "LORATUNE_OPTIMIZER_ADDRESS"}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli.main", "up", "--optimizer-port", str(optimizer)),
        *("--trainer-port", "0", "--evaluator-port", "0", "--judge-port", "0"),
        *("--metrics-port-base", "-1", "--artifact-root", str(tmp_path / "runs")),
        env={**env, "COLUMNS": "200", "LORATUNE_GRACE_PERIOD_SECONDS": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{optimizer}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(
                service="loratune.optimizer.v1.OptimizerService"
            )
            reply = await health.Check(request, timeout=90, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode()
    assert process.returncode == 0, text
    for name in ("optimizer", "trainer", "evaluator", "judge gateway"):
        assert re.search(rf"{name}\s+.*127\.0\.0\.1:\d+", text), text
    assert f"loratune tune --optimizer 127.0.0.1:{optimizer}" in text
    assert "SIGTERM received; stopping" in text
    assert "Traceback" not in text


async def test_a_base_whose_config_cannot_be_used_fails_the_study_at_once(
    stack: LocalStack, sentiment: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    # Real services: the trainer refuses the job naming the base's config; the study fails
    # at once with those words, one trial, none left RUNNING (it used to answer INTERNAL and
    # leave trials RUNNING while new ones started every poll).
    import json
    import shutil

    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_qwen, broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = "not a number"
    (broken / "config.json").write_text(json.dumps(config))
    result = await invoke(
        [*tune_args(sentiment, broken, "--n-trials", "20"), "--optimizer", stack.optimizer_address]
    )
    assert result.exit_code == 1, result.output
    assert "config.json cannot be used" in result.output
    async with grpc.aio.insecure_channel(stack.optimizer_address) as channel:
        stub: Any = optimizer_pb2_grpc.OptimizerServiceStub(channel)
        studies = (await stub.ListStudies(optimizer_pb2.ListStudiesRequest())).studies
        (study,) = [s for s in studies if s.state == optimizer_pb2.STUDY_STATE_FAILED]
        trials = (
            await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id=study.study_id))
        ).trials
    assert len(trials) == 1 and trials[0].state == optimizer_pb2.TRIAL_STATE_FAIL
    assert "config.json cannot be used" in study.failure_reason
