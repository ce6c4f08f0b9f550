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


async def test_a_running_study_reads_only_its_new_trials_and_forgets_them_when_it_ends(
    tmp_path: Path,
) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    store = StudyStore(storage)
    optuna.create_study(storage=storage, study_name="s", direction="maximize")
    store.activate("s")
    study = await store.study("s")
    for value in range(5):
        trial = study.ask()
        study.tell(trial, float(value))
    assert [t.value for t in await store.trials("s")] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert store.cached_trials() == 5
    # Another writer's finished trial (as after a restart) is read; cached ones are not again.
    other = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    late = other.ask()
    running = await store.trials("s", (optuna.trial.TrialState.RUNNING,))
    assert [t.number for t in running] == [5]
    other.tell(late, 9.0)
    assert (await store.trials("s"))[-1].value == 9.0
    # A user attribute set on a running trial is seen, through the cache, at every read.
    trial = study.ask()
    await store.set_trial_attrs(study, trial._trial_id, progress=1)
    assert (await store.trials("s"))[-1].user_attrs["progress"] == 1
    await store.set_trial_attrs(study, trial._trial_id, progress=2)
    assert (await store.trials("s"))[-1].user_attrs["progress"] == 2
    store.forget("s")
    assert store.cached_trials() == 0
    # Read after its end: straight from the database, nothing kept.
    assert len(await store.trials("s")) == 7 and store.cached_trials() == 0
