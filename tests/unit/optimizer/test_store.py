"""The async store: concurrent asks of one study never hand out the same trial."""

from __future__ import annotations

import asyncio
from pathlib import Path

import optuna

from services.optimizer.core.store import StudyStore


async def test_concurrent_asks_get_distinct_trials(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    store = StudyStore(storage)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for _ in range(3):
        study.enqueue_trial({"x": 1.0})
    trials = await asyncio.gather(*(store.ask(study) for _ in range(8)))
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(8))  # the enqueued ones once each, then new ones
