"""The loop's options: read from the environment, carried by the runner, applied by the loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from services.trainer.config import TrainerSettings
from services.trainer.core.loop import train
from services.trainer.core.models import BaseModelCache
from services.trainer.core.runner import LocalRunner
from services.trainer.core.types import (
    DEFAULT_LOOP_OPTIONS,
    DatasetSpec,
    Event,
    LoopOptions,
    ProgressEvent,
    RunContext,
    Task,
    TrainingSpec,
)
from services.trainer.main import loop_options
from tests.unit.trainer.conftest import Recorder, classification_data, make_spec, sentiment_rows

PROBE_VARIABLE = "LORATUNE_TRAINER_LINEAR_PROBE"
HEAD_ONLY_VARIABLE = "LORATUNE_TRAINER_HEAD_ONLY_FRACTION"


# ---- settings --------------------------------------------------------------------------------


def test_the_defaults_are_the_trainers_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROBE_VARIABLE, raising=False)
    monkeypatch.delenv(HEAD_ONLY_VARIABLE, raising=False)
    assert loop_options(TrainerSettings()) == LoopOptions() == DEFAULT_LOOP_OPTIONS
    assert DEFAULT_LOOP_OPTIONS.linear_probe is True
    assert DEFAULT_LOOP_OPTIONS.head_only_fraction == 0.0


def test_a_deployment_turns_the_probe_off_and_sets_the_head_only_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PROBE_VARIABLE, "false")
    monkeypatch.setenv(HEAD_ONLY_VARIABLE, "0.25")
    settings = TrainerSettings()
    assert settings.trainer_linear_probe is False
    assert settings.trainer_head_only_fraction == 0.25
    assert loop_options(settings) == LoopOptions(linear_probe=False, head_only_fraction=0.25)


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan"])
def test_a_head_only_fraction_out_of_range_stops_the_trainer_at_start_up(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(HEAD_ONLY_VARIABLE, value)
    with pytest.raises(ValidationError, match="trainer_head_only_fraction"):
        TrainerSettings()


@pytest.mark.parametrize(
    "changes",
    [
        {"head_only_fraction": 1.0},
        {"head_only_fraction": -0.5},
        {"head_lr_multiplier": 0.0},
        {"head_lr_multiplier": float("inf")},
        {"head_min_learning_rate": -1e-3},
    ],
)
def test_options_out_of_range_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LoopOptions(**changes)  # type: ignore[arg-type]


def test_options_cannot_be_flipped_after_the_fact() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LOOP_OPTIONS.linear_probe = False  # type: ignore[misc]


# ---- through the runner ------------------------------------------------------------------------


def _probe_scalars(log_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]  # the job did log its curves
    if "train/probe_accuracy" not in accumulator.Tags()["scalars"]:
        return []
    return [event.value for event in accumulator.Scalars("train/probe_accuracy")]


def test_the_runner_probes_the_head_only_when_its_options_say_so(
    minilm_dir: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "sentiment.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"text": text, "label": label}) + "\n"
            for text, label in sentiment_rows(24, seed=3)
        )
    )

    def run_job(runner: LocalRunner, name: str) -> list[float]:
        spec = dataclasses.replace(
            make_spec(
                minilm_dir,
                Task.CLASSIFICATION,
                tmp_path / name,
                training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=8, seed=7),
            ),
            job_id=name,
            dataset=DatasetSpec(
                uri=str(dataset), task=Task.CLASSIFICATION, validation_fraction=0.25
            ),
        )
        recorder = Recorder()
        completed = runner.run(
            spec,
            runner.validate(spec),
            RunContext(emit=recorder.emit, should_stop=recorder.should_stop),
        )
        runner.release()
        assert completed.artifact_dir == str(tmp_path / name)
        return _probe_scalars(tmp_path / name / "logs")

    default = LocalRunner(device="cpu")
    assert default.options == DEFAULT_LOOP_OPTIONS
    probed = run_job(default, "probed")
    assert len(probed) == 1 and 0.0 <= probed[0] <= 1.0

    unprobed = LocalRunner(device="cpu", options=LoopOptions(linear_probe=False))
    assert run_job(unprobed, "unprobed") == []


# ---- in the loop -------------------------------------------------------------------------------


def test_the_adapter_waits_out_the_head_only_phase(minilm_dir: Path) -> None:
    """With head_only_fraction 0.5 of 4 steps, the LoRA matrices stay as initialised for
    the first 2 steps while the head trains; then both move."""
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=4, seed=7),
    )
    cache = BaseModelCache("cpu")
    prepared = cache.acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(20, seed=4)
    data, encoded = classification_data(rows[:16], rows[16:], prepared.tokenizer)
    named = dict(prepared.model.named_parameters())
    lora = {n: p for n, p in named.items() if "lora_" in n and p.requires_grad}
    head = {n: p for n, p in named.items() if "modules_to_save" in n and p.requires_grad}
    assert lora and head

    def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in params.items()}

    initial_lora, initial_head = snapshot(lora), snapshot(head)
    moved: list[tuple[bool, bool]] = []  # (adapter moved, head moved) after each step

    def emit(event: Event) -> None:
        if isinstance(event, ProgressEvent):
            moved.append(
                (
                    any(not torch.equal(lora[n], t) for n, t in initial_lora.items()),
                    any(not torch.equal(head[n], t) for n, t in initial_head.items()),
                )
            )

    recorder = Recorder()
    train(
        prepared,
        data,
        encoded,
        spec,
        RunContext(emit=emit, should_stop=recorder.should_stop, progress_every_steps=1),
        options=LoopOptions(linear_probe=False, head_only_fraction=0.5),
    )
    assert moved == [(False, True), (False, True), (True, True), (True, True)]
    # Every parameter trainable again for the next job on this base.
    assert all(p.requires_grad for p in lora.values())
    cache.release()
