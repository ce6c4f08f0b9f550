"""The optimizer's study and trial metrics, recorded where the events happen (fake trainers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.optimizer import metrics
from services.optimizer.core.ports import JobFailed, TrainerState
from tests.unit.optimizer.test_optimizer_core import (
    FakeEvaluator,
    FakeTrainers,
    create,
    create_with,
    make,
    run,
)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in REGISTRY.collect():
        if family.name.startswith("loratune_optimizer"):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return value(name, **labels) - before.get(key, 0.0)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "b"}) + "\n")
    return path


def test_every_bounded_label_set_exists_from_the_start() -> None:
    for state in metrics.TRIAL_STATES:
        assert (
            REGISTRY.get_sample_value("loratune_optimizer_trials_total", {"state": state})
            is not None
        )
    for reason in metrics.FAILURE_REASONS:
        assert (
            REGISTRY.get_sample_value("loratune_optimizer_trial_failures_total", {"reason": reason})
            is not None
        )
    for reason in metrics.INTERRUPTION_REASONS:
        name = "loratune_optimizer_trial_interruptions_total"
        assert REGISTRY.get_sample_value(name, {"reason": reason}) is not None
    for objective in metrics.OBJECTIVES:
        name = "loratune_optimizer_trial_objective_count"
        assert REGISTRY.get_sample_value(name, {"objective": objective}) is not None
    assert REGISTRY.get_sample_value("loratune_optimizer_trials_waiting") is not None
    assert REGISTRY.get_sample_value("loratune_optimizer_trials_running") is not None


def test_objective_buckets_are_0_to_1_in_steps_of_0_05() -> None:
    bounds = [
        float(s.labels["le"])
        for f in REGISTRY.collect()
        if f.name == "loratune_optimizer_trial_objective"
        for s in f.samples
        if s.name.endswith("_bucket") and s.labels["objective"] == "f1_macro"
    ]
    assert bounds[:-1] == pytest.approx([0.05 * i for i in range(1, 21)])
    assert bounds[-1] == float("inf")


def test_labels_outside_the_sets_fold_into_other() -> None:
    assert metrics.objective_label("bleu") == "other"
    assert metrics.objective_label("f1_macro") == "f1_macro"
    assert metrics.failure_label("made up") == "other"


async def test_a_study_counts_its_trials_and_objectives_and_drops_its_gauges_at_the_end(
    tmp_path: Path, data: Path
) -> None:
    before = snapshot()
    trainers = FakeTrainers(epochs=1)
    trainers.curve = [0.8]
    trainers.lose = {1}  # trial 1 runs again (trainer lost)
    trainers.fail_with = {2: JobFailed("SHUTDOWN", "SIGTERM"), 3: JobFailed("NAN_LOSS", "nan")}
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    seen_best: list[float | None] = []
    seen_last_end: list[float | None] = []

    async def watch_gauges() -> None:
        while True:
            seen_best.append(
                REGISTRY.get_sample_value(
                    "loratune_optimizer_study_best_objective",
                    {"study": "m", "objective": "f1_macro"},
                )
            )
            seen_last_end.append(
                REGISTRY.get_sample_value(
                    "loratune_optimizer_study_last_trial_end_timestamp_seconds", {"study": "m"}
                )
            )
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch_gauges())
    try:
        request = create(data, n=5, pruner="none", name="m")
        # Every trial scores 0.8 here, so a sampler would keep proposing the frozen baseline
        # (free repeats, taken without a job); this test counts trials that run.
        request.search_space.num_epochs[:] = [1, 2, 3]
        study = await run(optimizer, request)
    finally:
        watcher.cancel()
    # The failed trial used one of the 5 (n_trials caps the trials a study starts).
    assert study.trials_complete == 4 and study.trials_failed == 1
    assert delta(before, "loratune_optimizer_trials_total", state="complete") == 4
    assert delta(before, "loratune_optimizer_trials_total", state="fail") == 1
    assert delta(before, "loratune_optimizer_trial_failures_total", reason="nan_loss") == 1
    interruptions = "loratune_optimizer_trial_interruptions_total"
    assert delta(before, interruptions, reason="trainer_lost") == 1
    assert delta(before, interruptions, reason="trainer_shutdown") == 1
    count = "loratune_optimizer_trial_objective_count"
    assert delta(before, count, objective="f1_macro") == 4
    total = "loratune_optimizer_trial_objective_sum"
    assert delta(before, total, objective="f1_macro") == pytest.approx(4 * 0.8)
    le = "loratune_optimizer_trial_objective_bucket"
    assert delta(before, le, objective="f1_macro", le="0.75") == 0
    assert delta(before, le, objective="f1_macro", le="0.8") == 4
    # While it ran: its best so far and when a trial last ended; both gone once it ended.
    assert 0.8 in seen_best
    assert any(t is not None and t > 0 for t in seen_last_end)
    assert (
        REGISTRY.get_sample_value(
            "loratune_optimizer_study_best_objective", {"study": "m", "objective": "f1_macro"}
        )
        is None
    )
    assert (
        REGISTRY.get_sample_value(
            "loratune_optimizer_study_last_trial_end_timestamp_seconds", {"study": "m"}
        )
        is None
    )
    assert value("loratune_optimizer_trials_running") == 0
    assert value("loratune_optimizer_trials_waiting") == 0


class BusyTrainers(FakeTrainers):
    """Trainers that all report busy: nothing can be dispatched."""

    async def status(self, address: str) -> TrainerState | None:
        return TrainerState(busy=True)


async def test_trials_wait_while_no_trainer_is_idle_and_a_cancel_counts_no_failure(
    tmp_path: Path, data: Path
) -> None:
    trainers = FakeTrainers(epochs=1)
    optimizer = make(tmp_path, trainers, FakeEvaluator())
    # Creation needs a reachable trainer; then every trainer turns busy.
    study = await create_with(optimizer, create(data, n=5, name="w", max_parallel_trials=2))
    optimizer.pool._trainers = BusyTrainers()  # type: ignore[attr-defined]
    optimizer._trials._trainers = BusyTrainers()  # type: ignore[attr-defined]
    for _ in range(500):
        if value("loratune_optimizer_trials_waiting") > 0:
            break
        await asyncio.sleep(0.01)
    assert value("loratune_optimizer_trials_waiting") == 2  # capped by max_parallel_trials
    assert value("loratune_optimizer_trainers", state="idle") == 0
    assert value("loratune_optimizer_trainers", state="busy") == 1
    await optimizer.cancel_study(study.study_id)
    assert value("loratune_optimizer_trials_waiting") == 0
    assert (
        REGISTRY.get_sample_value(
            "loratune_optimizer_study_last_trial_end_timestamp_seconds", {"study": "w"}
        )
        is None
    )
