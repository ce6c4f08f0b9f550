"""Studies and trials in Optuna's storage, reached from the event loop through a worker thread.

Every storage call (SQLite on one machine, PostgreSQL over the network in a cluster)
runs in `asyncio.to_thread`, so a slow database never stalls the gRPC server; updates of
one study's record are serialised by a per-study lock, so two trials finishing at once
cannot lose each other's change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.storages._cached_storage import _CachedStorage

from services.common.errors import InvalidArgument, NotFound
from services.common.names import excerpt
from services.optimizer.core.records import META, StudyRecord

T = TypeVar("T")
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StudyStore:
    """Async access to the studies in one Optuna storage."""

    def __init__(self, storage: optuna.storages.BaseStorage) -> None:
        self.storage = storage
        self._locks: dict[str, asyncio.Lock] = {}
        # The running studies' trials, cached in this process (Optuna's own cache of an RDB
        # storage, kept for the study's life): a read of a study fetches only its unfinished
        # and new trials, not all of them (optuna#3048: RDB reads grow with the trials). A
        # finished trial never changes, and this process is the studies' only writer. Each
        # load_study of a bare RDBStorage makes a fresh, empty cache, so without this every
        # read fetched every trial.
        self._cached = (
            _CachedStorage(storage) if isinstance(storage, optuna.storages.RDBStorage) else None
        )
        self._active: dict[str, int] = {}  # running study -> its id in the cache (-1: unread)

    def activate(self, study_id: str) -> None:
        """The study runs in this process: its reads go through the cache until `forget`."""
        self._active.setdefault(study_id, -1)

    @staticmethod
    async def run(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`call(*args, **kwargs)` in a worker thread."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def study(
        self,
        study_id: str,
        sampler: optuna.samplers.BaseSampler | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> optuna.Study:
        """The Optuna study, or NotFound."""
        if not study_id:
            raise InvalidArgument("must not be empty", field="study_id")
        cached = self._cached is not None and study_id in self._active
        try:
            study = await self.run(
                optuna.load_study,
                study_name=study_id,
                storage=self._cached if cached else self.storage,
                sampler=sampler,
                pruner=pruner,
            )
        except KeyError:
            raise NotFound(f"no study '{excerpt(study_id)}'") from None
        if cached and study_id in self._active:
            self._active[study_id] = study._study_id
        return study

    async def exists(self, study_id: str) -> bool:
        """Whether a study of that name is stored."""
        try:
            await self.study(study_id)
        except NotFound:
            return False
        return True

    async def create(self, study_id: str, record: StudyRecord) -> optuna.Study:
        """A new study holding `record`."""

        def create() -> optuna.Study:
            study = optuna.create_study(
                storage=self.storage, study_name=study_id, direction="maximize"
            )
            study.set_user_attr(META, record.to_storage())
            return study

        return await self.run(create)

    async def record(self, study_id: str) -> StudyRecord:
        """The study's record (NotFound when there is none)."""
        study = await self.study(study_id)
        # A storage read: in the worker thread, never on the event loop.
        stored = (await self.run(lambda: study.user_attrs)).get(META)
        if stored is None:
            raise NotFound(f"'{excerpt(study_id)}' is not a loratune study")
        return StudyRecord.from_storage(stored)

    async def update(self, study_id: str, **changes: Any) -> StudyRecord:
        """Changes fields of the study's record (serialised per study); returns it."""
        lock = self._locks.setdefault(study_id, asyncio.Lock())
        async with lock:
            record = await self.record(study_id)
            for name, value in changes.items():
                if not hasattr(record, name):
                    raise AttributeError(name)
                setattr(record, name, value)
            study = await self.study(study_id)
            await self.run(study.set_user_attr, META, record.to_storage())
            return record

    def forget(self, study_id: str) -> None:
        """Drops the study's locks and cached trials (it finished: a later update makes a new
        lock, a later read goes to the database)."""
        for key in (study_id, f"ask:{study_id}"):
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]
        cached_id = self._active.pop(study_id, None)
        if self._cached is not None and cached_id is not None and cached_id >= 0:
            with self._cached._lock:
                self._cached._studies.pop(cached_id, None)

    def cached_trials(self) -> int:
        """Trials held in the cache now (the memory the running studies use)."""
        if self._cached is None:
            return 0
        with self._cached._lock:
            return sum(len(info.trials) for info in self._cached._studies.values())

    async def ask(self, study: optuna.Study) -> optuna.trial.Trial:
        """`study.ask()`, one at a time per study: two concurrent asks in worker threads could
        both take the same enqueued trial (Optuna pops a waiting trial without a lock that
        spans threads), and one trial would then run twice."""
        lock = self._locks.setdefault(f"ask:{study.study_name}", asyncio.Lock())
        async with lock:
            return await self.run(study.ask)

    async def trials(
        self, study_id: str, states: tuple[optuna.trial.TrialState, ...] | None = None
    ) -> list[optuna.trial.FrozenTrial]:
        """The study's trials by number (optionally only those in `states`)."""
        study = await self.study(study_id)
        return await self.run(study.get_trials, deepcopy=False, states=states)

    async def trial(self, study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
        """One trial of a loaded study: two indexed lookups, not a load of every trial (a
        trial's handling reads it several times; loading the whole study each time made
        the optimizer's storage work grow with the square of the trials)."""

        def one() -> optuna.trial.FrozenTrial:
            storage = study._storage
            trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
            return storage.get_trial(trial_id)

        return await self.run(one)

    async def set_trial_attrs(self, study: optuna.Study, trial_id: int, **attrs: Any) -> None:
        """Sets user attributes of a trial."""

        def write() -> None:
            for name, value in attrs.items():
                study._storage.set_trial_user_attr(trial_id, name, value)

        await self.run(write)

    async def all_records(self) -> list[tuple[str, StudyRecord]]:
        """Every loratune study's name and record."""
        summaries = await self.run(
            optuna.get_all_study_summaries, self.storage, include_best_trial=False
        )
        out = []
        for summary in summaries:
            stored = summary.user_attrs.get(META)
            if stored is not None:
                out.append((summary.study_name, StudyRecord.from_storage(stored)))
        return out
