"""The optimizer's core: create, run, resume, cancel and report studies (domain types only).

A study's state is its record and its trials in Optuna's storage (`store.py`); its runner
(`_run_study`) asks for trials while there are idle trainers (`pool.py`) and hands each to
the trial lifecycle (`lifecycle.py`); clients follow it on the event bus (`events.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna

from services.common.defaults import TrainingDefaults
from services.common.durations import format_duration
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from services.common.names import ensure_under, validate_name
from services.optimizer import metrics
from services.optimizer.core import results
from services.optimizer.core.creation import StudyCreation, fingerprint, pruner, sampler
from services.optimizer.core.events import EventBus, StudyEvent, StudyFinished, StudyWaiting
from services.optimizer.core.lifecycle import LifecycleOptions, Outcome, TrialLifecycle
from services.optimizer.core.pool import TrainerPool
from services.optimizer.core.ports import (
    EvaluatorPort,
    JudgeCatalog,
    TrainerDiscovery,
    TrainerPort,
)
from services.optimizer.core.projects import Project, ProjectCatalog, ProjectSet
from services.optimizer.core.records import (
    ACTIVE,
    STATES,
    StudyRecord,
    StudyRequest,
    StudySpec,
)
from services.optimizer.core.report import SelectionReport, selection_report
from services.optimizer.core.space import PROBE_ONLY, default_trial
from services.optimizer.core.store import StudyStore
from services.optimizer.core.views import StudyView, TrialView, study_view, trial_view

logger = logging.getLogger(__name__)

# Job ids append "-t<trial>-a<attempt>" to the study name; trainers bound ids.
MAX_STUDY_NAME = 100


@dataclass(frozen=True)
class OptimizerOptions:
    """Behaviour settings (from OptimizerSettings)."""

    artifact_root: Path
    max_trial_failures: int = 10
    max_trial_attempts: int = 3
    max_trial_interruptions: int = 10
    evaluation_retry_seconds: float = 300.0
    poll_seconds: float = 1.0
    # Trainers may all be away for a while (discovered, or scaled from zero): a study with
    # none ready is accepted and waits, saying so (Study.waiting_reason).
    wait_for_trainers: bool = False


def budget_ran(finished: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that ran a job of their own (not `same_as` another's)."""
    return sum(1 for t in finished if "same_as" not in t.user_attrs)


def _budget_spent(record: StudyRecord, spec: StudySpec) -> bool:
    """Whether the study's time budget, counted from its start, is spent."""
    budget = spec.fine_tuning.time_budget_seconds
    if not budget or not record.start_time:
        return False
    started = datetime.fromisoformat(record.start_time)
    return bool((datetime.now(UTC) - started).total_seconds() >= budget)


def budget_used(finished: list[optuna.trial.FrozenTrial], n_trials: int) -> int:
    """Of the COMPLETE and PRUNED trials (by number), those counted against `n_trials`: every
    trial that ran its own job. Trials that took a twin's result (`same_as`) are free, but
    when the last `n_trials` of them in a row were all such repeats, the sampler has nothing
    new to propose: the whole budget counts as used, and the study ends."""
    ran = budget_ran(finished)
    trailing = 0
    for trial in reversed(finished):
        if "same_as" not in trial.user_attrs:
            break
        trailing += 1
    return n_trials if trailing >= n_trials else ran


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def _cancel_all(tasks: dict[asyncio.Task[Outcome], tuple[str, int]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Optimizer:
    """Creates, runs, resumes and reports studies. All state is in Optuna's storage."""

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        trainers: TrainerPort,
        discovery: TrainerDiscovery,
        evaluator: EvaluatorPort,
        judges: JudgeCatalog | None,
        defaults: TrainingDefaults,
        options: OptimizerOptions,
        bus: EventBus | None = None,
        projects: ProjectCatalog | None = None,
    ) -> None:
        self.store = StudyStore(storage)
        self.projects = projects or ProjectCatalog(None)
        self._trainers = trainers
        self._judges = judges
        self._defaults = defaults
        self._options = options
        self.bus = bus or EventBus()
        self.pool = TrainerPool(discovery, trainers)
        self._trials = TrialLifecycle(
            self.store,
            trainers,
            evaluator,
            self.bus,
            defaults,
            LifecycleOptions(
                artifact_root=options.artifact_root,
                max_trial_attempts=options.max_trial_attempts,
                max_trial_interruptions=options.max_trial_interruptions,
                evaluation_retry_seconds=options.evaluation_retry_seconds,
            ),
            job_ended=self.pool.job_ended,
        )
        self._creation = StudyCreation(judges, defaults, self.projects)
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        # Per running study: its trials on a trainer, and those it would start but cannot.
        self._running_trials: dict[str, int] = {}
        self._waiting_trials: dict[str, int] = {}
        # Studies none of whose trials runs for want of a trainer: (since, reason).
        self._waiting: dict[str, tuple[float, str]] = {}

    # ---- creating ----------------------------------------------------------------------

    async def create_study(self, request: StudyRequest) -> StudyView:
        """Validates, stores and starts a study; the same study_name again is idempotent."""
        if request.study_name:
            validate_name(request.study_name, "study_name", max_length=MAX_STUDY_NAME)
        spec = await self._creation.spec(request)
        study_id = request.study_name or f"study-{request.project_id}-{uuid.uuid4().hex[:8]}"
        # The name becomes the study's folder under the artifact root (and job ids).
        validate_name(study_id, "study_name", max_length=MAX_STUDY_NAME)
        ensure_under(self._options.artifact_root, Path(study_id), "study_name")
        print_ = fingerprint(spec)
        if await self.store.exists(study_id):
            existing = await self.store.record(study_id)
            if fingerprint(existing.spec) != print_:
                raise AlreadyExists(
                    f"study '{study_id}' exists with different parameters", field="study_name"
                )
            return await self.get_study(study_id)
        if not self._options.wait_for_trainers and await self.pool.reachable() == 0:
            # Documented: with a fixed list of trainers, creation needs one that answers, so
            # a misconfigured machine fails loudly instead of queueing forever. Where
            # trainers come and go (discovery, scale from zero) the study waits, saying so.
            raise Unavailable(
                "no trainer is reachable (LORATUNE_TRAINERS or Kubernetes discovery; "
                "LORATUNE_TRAINERS_SCALE_FROM_ZERO=true lets studies wait for one)"
            )
        record = StudyRecord(spec=spec, fingerprint=print_, create_time=_now())
        study = await self.store.create(study_id, record)
        first = default_trial(spec.space, self._defaults, spec.dataset.classification)
        if PROBE_ONLY in spec.space.num_epochs and first["num_epochs"] != PROBE_ONLY:
            # The frozen baseline first (each base's, when it searches several): cheap, and
            # the study can never select below it.
            # Floors take no parameters from the sampler (lifecycle: floor_parameters).
            for base in spec.space.base_model or ("",):
                attrs = {"attempt": 1, "role": "floor", **({"base_model": base} if base else {})}
                await self.store.run(study.enqueue_trial, {}, user_attrs=attrs)
        role = "floor" if first["num_epochs"] == PROBE_ONLY else "default"
        await self.store.run(study.enqueue_trial, first, user_attrs={"attempt": 1, "role": role})
        # Each named module set the first trial does not use goes first too: a set the model
        # lacks then fails the study on one of its first trials, not after many have run.
        for name in spec.space.module_sets:
            if name != first.get("target_modules"):
                trial = {**first, "target_modules": name}
                await self.store.run(study.enqueue_trial, trial, user_attrs={"attempt": 1})
        logger.info(
            "created study %s (%d trials, base model %s)",
            study_id,
            spec.fine_tuning.n_trials,
            ", ".join(spec.fine_tuning.bases),
        )
        if spec.pinned:
            logger.info(
                "study %s: fixed by the environment for every trial: %s", study_id, spec.pinned
            )
        self._start_runner(study_id)
        return await self.get_study(study_id)

    # ---- reading -----------------------------------------------------------------------

    async def get_study(self, study_id: str) -> StudyView:
        """One study."""
        record = await self.store.record(study_id)
        # Views read evaluation files from disk: in the worker thread too.
        view = await self.store.run(study_view, study_id, record, await self.store.trials(study_id))
        return self._with_waiting(view)

    async def list_studies(self, project_id: int) -> list[StudyView]:
        """Studies, newest first, optionally of one project."""
        out = []
        for study_id, record in await self.store.all_records():
            if project_id and record.spec.project_id != project_id:
                continue
            trials = await self.store.trials(study_id)
            out.append(
                self._with_waiting(await self.store.run(study_view, study_id, record, trials))
            )
        return sorted(out, key=lambda s: s.record.create_time, reverse=True)

    async def list_trials(self, study_id: str) -> list[TrialView]:
        """The study's trials by number."""
        return (await self.list_trial_page(study_id))[0]

    async def list_trial_page(
        self, study_id: str, page_size: int = 0, after: int = -1
    ) -> tuple[list[TrialView], int | None]:
        """The study's trials numbered above `after`, by number, at most `page_size` of them
        (0: all); and the last number of the page when more follow (None: none)."""
        await self.store.record(study_id)
        trials = [t for t in await self.store.trials(study_id) if t.number > after]
        last = None
        if page_size and len(trials) > page_size:
            trials = trials[:page_size]
            last = trials[-1].number
        return await self.store.run(lambda: [trial_view(t) for t in trials]), last

    async def watch(self, study_id: str) -> AsyncIterator[StudyEvent]:
        """The study's recent events, then live, until it finishes."""
        record = await self.store.record(study_id)
        if record.state not in ACTIVE and not self.bus.has_events(study_id):
            yield StudyEvent(study_id, StudyFinished(await self.get_study(study_id)))
            return
        async for event in self.bus.follow(study_id):
            yield event

    async def list_projects(self) -> ProjectSet:
        """The team's projects (the file read again if it changed), and its problem if any."""
        return await asyncio.to_thread(self.projects.current)

    async def get_project(self, project_id: int) -> Project:
        """One project; NotFound naming the id."""
        if project_id <= 0:
            raise InvalidArgument(f"must be a project id > 0, got {project_id}", field="project_id")
        return await asyncio.to_thread(self.projects.get, project_id)

    # ---- cancelling --------------------------------------------------------------------

    async def cancel_study(self, study_id: str) -> StudyView:
        """Cancels a running or queued study and the jobs of its trials."""
        record = await self.store.record(study_id)
        if record.state not in ACTIVE:
            raise FailedPrecondition(f"study '{study_id}' is already {record.state.lower()}")
        self._cancelled.add(study_id)
        await self.store.update(
            study_id, state="CANCELLED", end_time=_now(), failure_reason="cancelled by a client"
        )
        runner = self._runners.get(study_id)
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        # The runner is gone; its trials' jobs are not: tell their trainers to stop them (a
        # trial dispatched during the cancel recorded its job before sending it).
        running = await self.store.trials(study_id, (optuna.trial.TrialState.RUNNING,))
        jobs = [
            (str(t.user_attrs.get("trainer", "")), str(t.user_attrs.get("job_id", "")))
            for t in running
        ]
        stops = [self._trainers.cancel(address, job) for address, job in jobs if address and job]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
            logger.info("asked %d trainers to stop the jobs of study %s", len(stops), study_id)
        study = await self.store.study(study_id)
        for trial in running:
            await self._trials.tell_fail(study, trial.number, "study cancelled", count=False)
        await self._finish(study_id)
        return await self.get_study(study_id)

    # ---- running -----------------------------------------------------------------------

    def _start_runner(self, study_id: str) -> None:
        if study_id in self._runners and not self._runners[study_id].done():
            return
        task = asyncio.create_task(self._run_study(study_id), name=f"study-{study_id}")
        self._runners[study_id] = task
        task.add_done_callback(lambda _: self._runners.pop(study_id, None))

    async def resume_all(self) -> None:
        """After a restart: every unfinished study continues from storage alone."""
        for study_id, record in await self.store.all_records():
            if record.state in ACTIVE:
                logger.info("resuming study %s", study_id)
                self._start_runner(study_id)
        await self._update_study_gauge()

    async def shutdown(self) -> None:
        """Stops the runners without touching storage (a restart resumes them)."""
        for task in list(self._runners.values()):
            task.cancel()
        await asyncio.gather(*self._runners.values(), return_exceptions=True)

    async def _run_study(self, study_id: str) -> None:
        self.store.activate(study_id)  # its trials cached until it ends (_finish)
        record = await self.store.record(study_id)
        spec = record.spec
        study = await self.store.study(
            study_id, sampler(spec.sampler, seed=spec.dataset.seed), pruner(spec.pruner)
        )
        n_trials = spec.fine_tuning.n_trials
        if record.state == "RUNNING":  # resumed after a restart
            complete = await self.store.trials(study_id, (optuna.trial.TrialState.COMPLETE,))
            values = [t.value for t in complete if t.value is not None]
            metrics.study_running(study_id, max(values, default=None), spec.objective_name)
        # Each running trial's task, with the trainer and the lease it holds it under.
        running: dict[asyncio.Task[Outcome], tuple[str, int]] = {}
        # Trials interrupted through no fault of their own, waiting for a trainer to run on.
        pending: list[int] = []
        try:
            # Trials a previous process left running: reattach to their job, or run again.
            for trial in await self.store.trials(study_id, (optuna.trial.TrialState.RUNNING,)):
                held = str(trial.user_attrs.get("trainer", ""))
                if not held or not trial.user_attrs.get("job_id"):
                    pending.append(trial.number)
                    continue
                self.pool.claim(held)
                task = asyncio.create_task(self._trials.reattach(study, spec, trial))
                running[task] = (held, self.pool.lease(held))
            waiting_said = False
            # The trials are read again only when one may have ended (a task finished, or a
            # trial was started: it may have taken a twin's result); a wake-up with nothing
            # new reads the record alone. At 1,000 trials a read of them all is the cost.
            changed = True
            finished_trials: list[optuna.trial.FrozenTrial] = []
            finished = 0
            while True:
                record = await self.store.record(study_id)
                if study_id in self._cancelled or record.state == "CANCELLED":
                    return
                if changed:
                    finished_trials = await self.store.trials(
                        study_id,
                        (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
                    )
                    # Failed trials use the budget too (as in Optuna's own n_trials): a study
                    # never starts more than n_trials trials, re-runs of interrupted or
                    # retried ones aside.
                    failed = await self.store.trials(study_id, (optuna.trial.TrialState.FAIL,))
                    finished = budget_used(finished_trials, n_trials) + sum(
                        1 for t in failed if int(t.user_attrs.get("attempt", 1)) == 1
                    )
                    changed = False
                if finished >= n_trials and not running and not pending:
                    if not any(
                        t.state == optuna.trial.TrialState.COMPLETE for t in finished_trials
                    ):
                        await self._fail(
                            study_id,
                            f"no trial completed; last failure: {record.last_failure or '-'}",
                        )
                        return
                    if budget_ran(finished_trials) < n_trials and not record.end_note:
                        await self.store.update(
                            study_id,
                            end_note=f"the sampler proposed only points already run, "
                            f"{n_trials} times in a row",
                        )
                    await self._complete(study_id)
                    return
                spent = _budget_spent(record, spec)
                if spent:
                    if not record.end_note:
                        budget = format_duration(spec.fine_tuning.time_budget_seconds)
                        ran = budget_ran(finished_trials)
                        note = f"time budget of {budget} spent after {ran} of {n_trials} trials"
                        logger.info("study %s: %s; no trial starts now", study_id, note)
                        await self.store.update(study_id, end_note=note)
                    for number in pending:
                        await self._trials.tell_fail(
                            study, number, "not run again: the time budget was spent", count=False
                        )
                    pending.clear()
                    if not running:
                        await self._complete(study_id)
                        return
                if record.failures >= self._options.max_trial_failures:
                    await _cancel_all(running)
                    await self._fail(
                        study_id, f"{record.failures} trials failed; last: {record.last_failure}"
                    )
                    return
                if record.fatal:
                    await _cancel_all(running)
                    await self._fail(study_id, record.fatal)
                    return
                limit = spec.max_parallel_trials or 1_000
                address: str | None = None
                wanted = not spent and (pending or finished + len(running) < n_trials)
                starved = 0
                if wanted and len(running) < limit:
                    address = await self.pool.acquire()
                    if address is None:
                        unstarted = len(pending) + max(0, n_trials - finished - len(running))
                        starved = max(0, min(limit - len(running), unstarted))
                    if address is None and not running and not waiting_said:
                        logger.info("study %s waits for an idle trainer", study_id)
                        waiting_said = True
                    if address is None and not running:
                        self._wait(study_id, self.pool.waiting_reason())
                self._count_trials(study_id, len(running) + (address is not None), starved)
                if address is not None:
                    waiting_said = False
                    self._waiting.pop(study_id, None)
                    if record.state == "QUEUED":
                        await self.store.update(study_id, state="RUNNING", start_time=_now())
                        metrics.study_running(study_id)
                        await self._update_study_gauge()
                    if pending:
                        work = self._trials.dispatch(study, spec, pending.pop(0), address)
                    else:
                        work = self._trials.new_trial(study, spec, spec.space, address)
                    running[asyncio.create_task(work)] = (address, self.pool.lease(address))
                    changed = True
                    continue
                # Wait for a trial to end, or, while a trial waits for a trainer, for one to be
                # freed (by any study's job ending), or for the poll (new trainers appear).
                waiting: list[asyncio.Task[Any]] = list(running)
                freed = (
                    asyncio.create_task(self.pool.changed())
                    if wanted and len(running) < limit
                    else None
                )
                if freed is not None:
                    waiting.append(freed)
                if not waiting:
                    waiting.append(asyncio.create_task(asyncio.sleep(self._options.poll_seconds)))
                try:
                    done, _ = await asyncio.wait(
                        waiting,
                        timeout=self._options.poll_seconds,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    if freed is not None:
                        freed.cancel()
                for finished_task in done:
                    if finished_task not in running:
                        continue
                    changed = True
                    task = finished_task
                    self.pool.release(*running.pop(task))
                    if task.cancelled():
                        continue
                    if task.exception() is not None:
                        logger.error("trial task failed", exc_info=task.exception())
                        continue
                    outcome = task.result()
                    if outcome.interrupted:
                        pending.append(outcome.number)
        except asyncio.CancelledError:
            await _cancel_all(running)
            raise
        finally:
            for address, lease in running.values():
                self.pool.release(address, lease)
            self._running_trials.pop(study_id, None)
            self._waiting_trials.pop(study_id, None)
            self._waiting.pop(study_id, None)
            self._set_trial_gauges()

    def _wait(self, study_id: str, reason: str) -> None:
        """Records that the study waits for a trainer; a new wait, or a new reason, is an
        event of its stream."""
        held = self._waiting.get(study_id)
        if held is not None and held[1] == reason:
            return
        since = held[0] if held is not None else time.time()
        self._waiting[study_id] = (since, reason)
        self.bus.publish(study_id, StudyWaiting(reason=reason, since=since))

    def _with_waiting(self, view: StudyView) -> StudyView:
        held = self._waiting.get(view.study_id)
        if held is None:
            return view
        return replace(view, waiting_since=held[0], waiting_reason=held[1])

    def _count_trials(self, study_id: str, running: int, waiting: int) -> None:
        self._running_trials[study_id] = running
        self._waiting_trials[study_id] = waiting
        self._set_trial_gauges()

    def _set_trial_gauges(self) -> None:
        metrics.TRIALS_RUNNING.set(sum(self._running_trials.values()))
        metrics.TRIALS_WAITING.set(sum(self._waiting_trials.values()))

    # ---- endings -----------------------------------------------------------------------

    async def _fail(self, study_id: str, reason: str) -> None:
        logger.error("study %s failed: %s", study_id, reason)
        await self.store.update(study_id, state="FAILED", end_time=_now(), failure_reason=reason)
        await self._finish(study_id)

    async def _complete(self, study_id: str) -> None:
        trials = await self.store.trials(study_id)
        report = await self.store.run(selection_report, trials)
        best_dir = ""
        if report is not None:
            published = next(t for t in trials if t.number == report.published_trial)
            source = Path(str(published.user_attrs.get("artifact_dir", "")))
            models_root = self._options.artifact_root / "models"
            if source.is_dir():
                if report.ensemble_published:
                    folders = {
                        t.number: Path(str(t.user_attrs.get("artifact_dir", ""))) for t in trials
                    }
                    members = [(n, folders[n]) for n in report.ensemble_trials]
                    target = await self.store.run(
                        results.publish_ensemble, members, models_root, study_id
                    )
                else:
                    target = await self.store.run(
                        results.publish_best, source, models_root, study_id
                    )
                best_dir = str(target)
                summary = await self._summary(study_id, published.number, report)
                await self.store.run(results.write_study_summary, target, summary)
            record = await self.store.record(study_id)
            logger.info(
                "study %s completed: published %s, %s=%.4f, to %s",
                study_id,
                f"the ensemble of trials {', '.join(map(str, report.ensemble_trials))}"
                if report.ensemble_published
                else f"trial {published.number}",
                record.spec.objective_name,
                published.value or 0.0,
                best_dir,
            )
            if report.warning:
                logger.warning("study %s: %s", study_id, report.warning)
        await self.store.update(
            study_id,
            state="COMPLETED",
            end_time=_now(),
            best_model_dir=best_dir,
            report=None if report is None else report.to_json(),
        )
        await self._finish(study_id)

    async def _finish(self, study_id: str) -> None:
        # Nothing of a finished study stays in this process but what clients read from storage.
        metrics.forget_study(study_id)
        self._cancelled.discard(study_id)
        self.store.forget(study_id)
        self.bus.publish(study_id, StudyFinished(await self.get_study(study_id)))
        await self._update_study_gauge()

    async def _update_study_gauge(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for _, record in await self.store.all_records():
            if record.state in counts:
                counts[record.state] += 1
        for state, value in counts.items():
            metrics.STUDIES.labels(state=state.lower()).set(value)

    async def _summary(
        self, study_id: str, best_number: int, report: SelectionReport
    ) -> dict[str, Any]:
        record = await self.store.record(study_id)
        view = study_view(study_id, record, [])
        return {
            "study_id": study_id,
            "project_id": record.spec.project_id,
            "objective_name": record.spec.objective_name,
            "best_trial": best_number,
            # The floor, the default trial, the best on validation, the noise behind the
            # choice and what was published (core/report.py).
            "report": report.to_json(),
            "end_note": record.end_note,
            "fine_tuning_params": asdict(record.spec.fine_tuning),
            "pinned_by_environment": dict(record.spec.pinned),
            "excluded_classes": record.excluded_classes or [],
            "excluded_note": view.excluded_note,
            "trials": [
                {
                    "number": t.number,
                    "state": t.state.name,
                    "params": t.params,
                    "objective": t.value,
                    "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
                    "best_epoch": t.user_attrs.get("best_epoch"),
                    "epochs": t.user_attrs.get("epochs", []),
                    "interruptions": t.user_attrs.get("interruption_reasons", []),
                    "attempt": t.user_attrs.get("attempt"),
                    "trainer": t.user_attrs.get("trainer"),
                    "failure_reason": t.user_attrs.get("failure_reason", ""),
                    "artifact_dir": t.user_attrs.get("artifact_dir", ""),
                }
                for t in await self.store.trials(study_id)
            ],
        }
