"""`loratune evaluate`: in-process and against a running evaluator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.evaluator.core.bertscore import packaged_minilm_path

runner = CliRunner()


def write(path: Path, items: list[str]) -> Path:
    path.write_text("\n".join(items) + "\n", encoding="utf-8")
    return path


def test_classification_in_process(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.txt", ["62", "62", "68", "51"])
    refs = write(tmp_path / "r.txt", ["62", "68", "68", "51"])
    out = tmp_path / "result.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--task",
            "classification",
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "F1 macro" in result.output and "Per class" in result.output
    data = json.loads(out.read_text())
    assert data["objectiveName"] == "f1_macro"
    assert data["classification"]["accuracy"] == pytest.approx(0.75)


def test_mismatched_files_give_a_clear_error(tmp_path: Path) -> None:
    preds = write(tmp_path / "p.txt", ["a", "b"])
    refs = write(tmp_path / "r.txt", ["a"])
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--task",
            "classification",
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            "--output",
            str(tmp_path / "o.json"),
        ],
    )
    assert result.exit_code == 2
    assert "INVALID_ARGUMENT" in result.output and "references: has 1 items" in result.output


def test_missing_file_is_reported(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--task",
            "generation",
            "--predictions",
            str(tmp_path / "none.txt"),
            "--references",
            str(tmp_path / "none.txt"),
        ],
    )
    assert result.exit_code == 2
    assert "cannot read --predictions" in result.output


async def test_generation_with_judge_against_a_running_evaluator(
    tmp_path: Path, evaluator: Any
) -> None:
    preds = write(tmp_path / "p.txt", ["the card arrived", "refund in five days", "hello"])
    refs = write(tmp_path / "r.txt", ["my card has arrived", "refunds take 5 days", "hi"])
    prompts = write(tmp_path / "q.txt", ["card?", "refund?", "greet"])
    out = tmp_path / "gen.json"
    # The server runs on this test's event loop: the CLI (with its own loop) runs in a thread.
    result = await asyncio.to_thread(
        runner.invoke,
        app,
        [
            "evaluate",
            "--task",
            "generation",
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            "--prompts",
            str(prompts),
            "--judge",
            "gemini",
            "--evaluator",
            evaluator.server.address,
            "--output",
            str(out),
            "--timeout",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "combined" in result.output and "LLM judge (gemini)" in result.output
    data = json.loads(out.read_text())
    assert data["judge"]["judged"] == 3
    assert data["combinedScore"] == pytest.approx(0.4 * data["bertscore"]["f1"] + 0.6 * 0.70)


async def test_refusals_exit_2_from_a_running_evaluator_as_in_process(
    tmp_path: Path, evaluator: Any
) -> None:
    preds = write(tmp_path / "p.txt", ["the card arrived", "refund in five days"])
    refs = write(tmp_path / "r.txt", ["my card has arrived", "refunds take 5 days"])
    prompts = write(tmp_path / "q.txt", ["card?", "refund?"])
    common = ["evaluate", "--task", "generation", "--evaluator", evaluator.server.address]
    common += ["--output", str(tmp_path / "o.json"), "--timeout", "60"]
    files = ["--predictions", str(preds), "--prompts", str(prompts)]

    # The server runs on this test's event loop: the CLI (with its own loop) runs in a thread.
    result = await asyncio.to_thread(
        runner.invoke, app, [*common, *files, "--references", str(refs), "--judge", "nope"]
    )
    assert result.exit_code == 2, result.output
    assert "error (NOT_FOUND): LLM Judge model not found: 'nope'" in result.output

    short = write(tmp_path / "short.txt", ["my card has arrived"])
    result = await asyncio.to_thread(
        runner.invoke, app, [*common, *files, "--references", str(short)]
    )
    assert result.exit_code == 2, result.output
    assert "error (INVALID_ARGUMENT): references: has 1 items" in result.output
    assert not (tmp_path / "o.json").exists()


def test_generation_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUNE_BERTSCORE_MODEL", packaged_minilm_path())
    monkeypatch.setenv("LORATUNE_BERTSCORE_LAYERS", "6")
    preds = write(tmp_path / "p.txt", ["the card arrived", ""])
    refs = write(tmp_path / "r.txt", ["my card has arrived", "where is it"])
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--task",
            "generation",
            "--predictions",
            str(preds),
            "--references",
            str(refs),
            "--output",
            str(tmp_path / "g.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["bertscore"]["emptyTexts"] == 1
