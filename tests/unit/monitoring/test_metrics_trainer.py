"""The trainer's throughput metrics: rows trained, tokens generated and their speed."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.trainer.core.loop import train
from services.trainer.core.models import BaseModelCache
from services.trainer.core.types import RunContext, Task, TrainingSpec
from tests.unit.trainer.conftest import (
    Recorder,
    build_tiny_qwen,
    echo_rows,
    generation_data,
    make_spec,
)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


def value(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_training_counts_rows_and_generation_counts_tokens_and_speed(tiny_qwen: Path) -> None:
    spec = make_spec(
        tiny_qwen,
        Task.GENERATION,
        training=TrainingSpec(learning_rate=1e-2, num_epochs=1, batch_size=4, seed=5),
        max_eval_samples=4,
        max_new_tokens=3,
    )
    prepared = BaseModelCache("cpu").acquire(spec, [])
    rows = echo_rows(12, seed=4)
    data, encoded = generation_data(rows[:8], rows[8:], prepared.tokenizer)
    recorder = Recorder()
    samples = value("loratune_trainer_samples_total")
    tokens = value("loratune_trainer_generated_tokens_total")

    train(
        prepared,
        data,
        encoded,
        spec,
        RunContext(emit=recorder.emit, should_stop=recorder.should_stop, progress_every_steps=1),
    )

    assert value("loratune_trainer_samples_total") - samples == 8  # 8 rows, one epoch
    generated = value("loratune_trainer_generated_tokens_total") - tokens
    assert 4 <= generated <= 4 * 3  # 4 prompts, at most 3 new tokens each, at least one
    assert value("loratune_trainer_generation_tokens_per_second") > 0


def test_the_trainer_counts_its_busy_and_idle_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trainer import metrics

    # The process's own clock is exported as a counter by state, growing between scrapes.
    before = REGISTRY.get_sample_value("loratune_trainer_seconds_total", {"state": "idle"})
    assert before is not None and before >= 0
    assert (
        REGISTRY.get_sample_value("loratune_trainer_seconds_total", {"state": "idle"}) or 0
    ) >= (before)
    assert (
        REGISTRY.get_sample_value("loratune_trainer_seconds_total", {"state": "busy"}) is not None
    )
    now = [1000.0]
    with monkeypatch.context() as patched:
        patched.setattr(metrics.time, "monotonic", lambda: now[0])
        clock = metrics.TrainerClock()
        now[0] += 30  # idle
        clock.set_busy(True)
        now[0] += 120  # a job
        clock.set_busy(False)
        now[0] += 10
        assert clock.totals() == {"busy": 120.0, "idle": 40.0}
        now[0] += 5
        assert clock.totals() == {"busy": 120.0, "idle": 45.0}  # counts up to the scrape
