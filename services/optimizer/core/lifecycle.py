"""One trial's life: dispatch to a trainer, follow its job, evaluate, report, prune, tell.

A trial ends in one of three ways: told (COMPLETE with its best epoch's objective, PRUNED,
or FAIL with the reason), interrupted through no fault of its own (its trainer stopped or
vanished, the optimizer restarted: it runs again, same parameters and number, uncounted,
up to `max_trial_interruptions`), or it stops the study (`fatal`: bad data, a refused job,
an evaluator that cannot score).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna

from services.common.errors import InvalidArgument, LoratuneError, ResourceExhausted, Unavailable
from services.common.names import excerpt
from services.optimizer import metrics
from services.optimizer.core import results
from services.optimizer.core.creation import hyperparameters
from services.optimizer.core.events import (
    EventBus,
    TrialEvaluated,
    TrialFinished,
    TrialProgress,
    TrialStarted,
)
from services.optimizer.core.ports import (
    EvaluatorPort,
    JobCompleted,
    JobDataPrepared,
    JobEvaluation,
    JobEvent,
    JobFailed,
    JobProgress,
    TrainerPort,
    TrainingJob,
)
from services.optimizer.core.records import Hyperparameters, StudySpec
from services.optimizer.core.scoring import Scoring, log_evaluation
from services.optimizer.core.space import (
    PROBE_ONLY,
    SearchSpace,
    floor_parameters,
    result_key,
    sampled_epochs,
    suggest,
)
from services.optimizer.core.store import StudyStore
from services.optimizer.core.views import excluded_note, trial_view

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LifecycleOptions:
    """How hard the optimizer tries (from OptimizerSettings)."""

    artifact_root: Path
    max_trial_attempts: int = 3
    max_trial_interruptions: int = 10
    evaluation_retry_seconds: float = 300.0


# How often a trial waiting for a running twin's result looks at it.
TWIN_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Outcome:
    """How a trial's task ended: done (told, or failed), or interrupted and to run again."""

    number: int
    interrupted: bool = False
    reused: bool = False  # took a finished twin's result: no job ran, no trainer was used


@dataclass(frozen=True)
class TrialRun:
    """One attempt of one trial on one trainer: what following its job needs."""

    study: optuna.Study
    spec: StudySpec
    number: int
    trial_id: int
    job_id: str
    address: str
    attempt: int
    params: dict[str, Any]
    trial_dir: Path
    probe_only: bool = False  # the frozen probe alone: never reported to the pruner


class TrialLifecycle:
    """Runs trials of any study; the study's runner decides when and where."""

    def __init__(
        self,
        store: StudyStore,
        trainers: TrainerPort,
        evaluator: EvaluatorPort,
        bus: EventBus,
        defaults: Any,
        options: LifecycleOptions,
        job_ended: Callable[[str], None] = lambda address: None,
    ) -> None:
        self._store = store
        # Told the trainer's address as soon as its job ends (before the trial's own
        # bookkeeping): the pool marks its pod idle at once (pod-deletion-cost).
        self._job_ended = job_ended
        self._trainers = trainers
        self._scoring = Scoring(evaluator, options.evaluation_retry_seconds)
        self._bus = bus
        self._defaults = defaults
        self._options = options

    # ---- starting ----------------------------------------------------------------------

    async def new_trial(
        self, study: optuna.Study, spec: StudySpec, space: SearchSpace, address: str
    ) -> Outcome:
        """Asks the sampler for a trial, stores its hyperparameters and dispatches it."""
        trial = await self._store.ask(study)
        return await self._guarded(
            study, trial.number, self._start_new(study, spec, space, address, trial)
        )

    async def _start_new(
        self,
        study: optuna.Study,
        spec: StudySpec,
        space: SearchSpace,
        address: str,
        trial: optuna.Trial,
    ) -> Outcome:
        record = await self._store.record(study.study_name)
        classification = spec.dataset.classification
        if trial.user_attrs.get("role") == "floor":
            # A base's floor: no sampler asked (trial.params stays empty, so the sampler
            # never learns from it and never proposes it again).
            base = str(trial.user_attrs.get("base_model", ""))
            params = floor_parameters(space, self._defaults, classification, base)
        else:
            epochs = await self._store.run(_epoch_choices, study, space)
            params = await self._store.run(
                suggest, trial, space, self._defaults, classification, epochs=epochs
            )
        key = json.dumps(trial.params or dataclasses.asdict(params), sort_keys=True)
        if key in record.oom_configs:
            # Never dispatched: this exact configuration ran out of memory before. Counted, so
            # a space whose every configuration runs out of memory ends instead of looping.
            await self.tell_fail(
                study,
                trial.number,
                "skipped: this configuration ran out of memory",
                kind="oom_skipped",
            )
            return Outcome(trial.number)
        hyper = hyperparameters(spec, params, self._defaults)
        # Every resolved parameter (fixed dimensions too: Optuna records only those it drew).
        deciding = result_key(dataclasses.asdict(params))
        # One read for both kinds of twin: checked apart, a twin that completed between the
        # two reads would be missed by both.
        twin, running = await self._store.run(_twins, study, deciding, trial.number)
        if twin is not None:
            return await self._take_twins_result(
                study, trial, twin, hyper, deciding, params.base_model
            )
        trial_dir = self._options.artifact_root / study.study_name / f"trial-{trial.number}"
        await self._store.set_trial_attrs(
            study,
            trial._trial_id,
            attempt=int(trial.user_attrs.get("attempt", 1)),
            artifact_dir=str(trial_dir.resolve()),
            hyperparameters=hyper.to_storage(),
            params_key=key,
            result_key=deciding,
            base_model=params.base_model or spec.fine_tuning.base_model_name,
        )
        logger.info("Trial %d: params=%s", trial.number, params.as_log_dict())
        if running is not None:
            return await self._after_twin(
                study, trial, running, hyper, deciding, address, params.base_model
            )
        return await self._dispatch(study, spec, trial.number, address)

    async def _after_twin(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        twin: optuna.trial.FrozenTrial,
        hyper: Hyperparameters,
        deciding: str,
        address: str,
        base_model: str,
    ) -> Outcome:
        """The same result-deciding parameters as a trial still running (proposed while its
        result was being recorded, or by trials in parallel): the trainer is freed for other
        work, and the trial takes the twin's result when it completes; when it does not, the
        trial runs its own job on the next free trainer (an uncounted interruption)."""
        logger.info(
            "Trial %d: the same result-deciding parameters as trial %d, still running; "
            "waiting for its result",
            trial.number,
            twin.number,
        )
        await self._store.set_trial_attrs(study, trial._trial_id, waits_for=twin.number)
        self._job_ended(address)
        # The store is the truth: every path that ends a trial records it there.
        while not (twin := await self._store.trial(study, twin.number)).state.is_finished():  # noqa: ASYNC110
            await asyncio.sleep(TWIN_POLL_SECONDS)
        await self._store.set_trial_attrs(study, trial._trial_id, waits_for=None)
        if twin.state == optuna.trial.TrialState.COMPLETE:
            return await self._take_twins_result(study, trial, twin, hyper, deciding, base_model)
        return Outcome(trial.number, interrupted=True)

    async def _guarded(self, study: optuna.Study, number: int, work: Any) -> Outcome:
        """Runs a trial's handling so that it always ends in a recorded state: whatever the
        trainer answers or the optimizer's own code raises, the trial is told FAIL with the
        reason (counted: the study's failure limit ends a study that cannot run trials)."""
        try:
            return cast(Outcome, await work)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # anything: a trial left RUNNING would be started again
            logger.exception("Trial %d: its handling failed", number)
            reason = f"the optimizer could not run the trial: {type(err).__name__}: {err}"
            await self.tell_fail(study, number, excerpt(reason, 300), kind="internal")
            return Outcome(number)

    async def _take_twins_result(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        twin: optuna.trial.FrozenTrial,
        hyper: Hyperparameters,
        deciding: str,
        base_model: str,
    ) -> Outcome:
        """A trial whose result-deciding parameters equal a COMPLETE trial's: it takes that
        trial's value, epochs and adapter folder, runs no job, and is not counted against
        `n_trials` (`same_as`); the sampler learns the value all the same."""
        attrs = twin.user_attrs
        await self._store.set_trial_attrs(
            study,
            trial._trial_id,
            attempt=1,
            same_as=twin.number,
            artifact_dir=str(attrs.get("artifact_dir", "")),
            hyperparameters=hyper.to_storage(),
            params_key=json.dumps(trial.params, sort_keys=True),
            result_key=deciding,
            base_model=base_model or str(attrs.get("base_model", "")),
            epochs=list(attrs.get("epochs", [])),
            best_epoch=attrs.get("best_epoch", 0),
        )
        await self._store.run(study.tell, trial.number, twin.value)
        logger.info(
            "Trial %d: the same result-deciding parameters as trial %d; its value %.4f "
            "taken without a job",
            trial.number,
            twin.number,
            twin.value or 0.0,
        )
        metrics.TRIALS.labels(state="reused").inc()
        frozen = await self._store.trial(study, trial.number)
        self._bus.publish(
            study.study_name, TrialFinished(await self._store.run(trial_view, frozen))
        )
        return Outcome(trial.number, reused=True)

    async def dispatch(
        self, study: optuna.Study, spec: StudySpec, number: int, address: str
    ) -> Outcome:
        """Sends a trial (new, or interrupted before) to the trainer at `address`, follows it."""
        return await self._guarded(study, number, self._dispatch(study, spec, number, address))

    async def _dispatch(
        self, study: optuna.Study, spec: StudySpec, number: int, address: str
    ) -> Outcome:
        frozen = await self._store.trial(study, number)
        if frozen.state.is_finished():  # told meanwhile: nothing left to run
            logger.warning(
                "Trial %d is already %s; not dispatched again", number, frozen.state.name
            )
            return Outcome(number)
        attrs = frozen.user_attrs
        attempt = int(attrs.get("attempt", 1))
        job_id = f"{study.study_name}-t{number}-a{attempt}"
        await self._store.set_trial_attrs(study, frozen._trial_id, job_id=job_id, trainer=address)
        logger.info("Trial %d (attempt %d) dispatched to %s", number, attempt, address)
        frozen = await self._store.trial(study, number)
        self._bus.publish(study.study_name, TrialStarted(await self._store.run(trial_view, frozen)))
        job = TrainingJob(
            job_id=job_id,
            base_model=str(attrs.get("base_model") or spec.fine_tuning.base_model_name),
            dataset=spec.dataset,
            hyperparameters=Hyperparameters.from_storage(attrs.get("hyperparameters", {})),
            output_dir=str(attrs.get("artifact_dir", "")),
            max_eval_samples=spec.max_eval_samples,
        )
        try:
            await self._trainers.start(address, job)
        except ResourceExhausted:
            metrics.DISPATCH_ERRORS.labels(reason="busy").inc()
            return await self.interrupted(
                study, number, f"trainer {address} was busy", kind="trainer_busy"
            )
        except Unavailable as err:
            metrics.DISPATCH_ERRORS.labels(reason="unavailable").inc()
            return await self.interrupted(
                study, number, f"trainer {address} unavailable: {err}", kind="trainer_unavailable"
            )
        except InvalidArgument as err:
            metrics.DISPATCH_ERRORS.labels(reason="invalid").inc()
            await self.tell_fail(study, number, str(err), kind="trainer_refused")
            await self._store.update(study.study_name, fatal=f"the trainer refused the job: {err}")
            return Outcome(number)
        except LoratuneError as err:
            # Any other answer (INTERNAL, FAILED_PRECONDITION, ...): this trial failed,
            # counted; the study's failure limit ends a study whose trials cannot start.
            metrics.DISPATCH_ERRORS.labels(reason="error").inc()
            await self.tell_fail(
                study, number, f"the trainer could not start the job: {err}", kind="internal"
            )
            return Outcome(number)
        return await self._follow(self._run_of(study, spec, frozen, job_id, address, attempt))

    async def reattach(
        self, study: optuna.Study, spec: StudySpec, frozen: optuna.trial.FrozenTrial
    ) -> Outcome:
        """Follows a job a previous optimizer process dispatched (after a restart)."""
        attrs = frozen.user_attrs
        job_id, address = str(attrs.get("job_id", "")), str(attrs.get("trainer", ""))
        logger.info("reattaching trial %d to job %s on %s", frozen.number, job_id, address)
        run = self._run_of(study, spec, frozen, job_id, address, int(attrs.get("attempt", 1)))
        return await self._guarded(study, frozen.number, self._follow(run))

    @staticmethod
    def _run_of(
        study: optuna.Study,
        spec: StudySpec,
        frozen: optuna.trial.FrozenTrial,
        job_id: str,
        address: str,
        attempt: int,
    ) -> TrialRun:
        return TrialRun(
            study=study,
            spec=spec,
            number=frozen.number,
            trial_id=frozen._trial_id,
            job_id=job_id,
            address=address,
            attempt=attempt,
            params=dict(frozen.params),
            trial_dir=Path(str(frozen.user_attrs.get("artifact_dir", ""))),
            probe_only=Hyperparameters.from_storage(
                frozen.user_attrs.get("hyperparameters", {})
            ).probe_only,
        )

    # ---- following ---------------------------------------------------------------------

    async def _ended_early(
        self, events: AsyncIterator[JobEvent], address: str
    ) -> AsyncIterator[JobEvent]:
        """`events`, read ahead of the trial's handling: the job's end is told to the pool
        (`job_ended`) when the trainer sends it, not after the last epoch's evaluation,
        which may take a second while the trainer already sits idle."""
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in events:
                    if isinstance(event, JobCompleted | JobFailed):
                        self._job_ended(address)
                    await queue.put(("event", event))
                await queue.put(("end", None))
            except Exception as err:
                await queue.put(("error", err))

        reader = asyncio.create_task(pump())
        try:
            while True:
                kind, value = await queue.get()
                if kind == "event":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _follow(self, run: TrialRun) -> Outcome:
        """Follows the job's events to the trial's end: evaluate, report, prune, tell.

        The trial's value is its best epoch's objective, and the adapter kept in its folder
        is that epoch's; every epoch's evaluation stays on record (`epochs` in the trial's
        attributes, `evaluation_curve.json` in its folder).
        """
        started = time.monotonic()
        study, number = run.study, run.number
        frozen = await self._store.trial(study, number)
        trial = optuna.Trial(study, run.trial_id)
        epochs: list[results.EpochResult] = []
        excluded: list[dict[str, Any]] = list(frozen.user_attrs.get("excluded_classes", []))
        # After a restart the replayed evaluations were reported before: not again.
        reported = set(frozen.intermediate_values)
        events = self._ended_early(self._trainers.watch(run.address, run.job_id), run.address)
        try:
            while True:
                try:
                    event = await anext(events, None)
                except LoratuneError as err:
                    # NOT_FOUND after a trainer (or optimizer) restart, UNAVAILABLE or a broken
                    # stream when it died: not the trial's fault; its parameters run again.
                    metrics.DISPATCH_ERRORS.labels(reason="trainer_lost").inc()
                    return await self.interrupted(
                        study, number, f"trainer {run.address} lost: {err}", kind="trainer_lost"
                    )
                if event is None:
                    return await self.interrupted(
                        study,
                        number,
                        f"trainer {run.address} stopped answering",
                        kind="trainer_lost",
                    )
                if isinstance(event, JobDataPrepared) and event.excluded:
                    excluded = await self._record_excluded(run, event)
                elif isinstance(event, JobProgress):
                    self._bus.publish(
                        study.study_name,
                        TrialProgress(
                            number, event.epoch, event.step, event.total_steps, event.loss
                        ),
                    )
                elif isinstance(event, JobEvaluation):
                    try:
                        scored = await self._scoring.score(run.spec, event, excluded)
                    except LoratuneError as err:
                        # The evaluator refused (a bad judge, bad input) or stayed away past the
                        # retry budget: the study cannot be scored, so it stops with the reason.
                        await self.tell_fail(
                            study, number, f"evaluation failed: {err}", kind="evaluation"
                        )
                        await self._store.update(
                            study.study_name, fatal=f"evaluation failed: {err}"
                        )
                        await self._trainers.cancel(run.address, run.job_id)
                        return Outcome(number)
                    evaluation = scored.evaluation
                    epoch = results.EpochResult(
                        index=len(epochs) + 1,
                        epoch=event.epoch,
                        eval_loss=event.eval_loss,
                        adapter_dir=event.adapter_dir,
                        evaluation=evaluation,
                        refusals=scored.refusals,
                        last_refusal=scored.last_refusal,
                    )
                    epochs.append(epoch)
                    await self._store.run(results.record_epoch, run.trial_dir, epochs)
                    if event.labels:  # classification: kept for the study's noise estimate
                        await self._store.run(
                            results.record_predictions,
                            run.trial_dir,
                            epoch.index,
                            event.labels,
                            event.predictions,
                            event.references,
                        )
                    await self._store.set_trial_attrs(
                        study, run.trial_id, epochs=[e.record() for e in epochs]
                    )
                    log_evaluation(number, run.params, scored)
                    self._bus.publish(
                        study.study_name,
                        TrialEvaluated(
                            number,
                            event.epoch,
                            evaluation,
                            refusals=scored.refusals,
                            last_refusal=scored.last_refusal,
                        ),
                    )
                    if run.probe_only:
                        # A frozen pass is no epoch of training: reported to the pruner, it
                        # would set the bar a trained trial's first epoch must clear (on
                        # banking77-LT that pruned 13 of a study's first 16 trials).
                        pass
                    elif epoch.index not in reported:
                        await self._store.run(trial.report, evaluation.objective, epoch.index)
                    if not run.probe_only and await self._store.run(trial.should_prune):
                        await self._trainers.cancel(run.address, run.job_id)
                        await self._store.run(
                            study.tell, number, state=optuna.trial.TrialState.PRUNED
                        )
                        await self._finished(study, number, started, "pruned")
                        return Outcome(number)
                elif isinstance(event, JobCompleted):
                    if not epochs:
                        await self.tell_fail(
                            study,
                            number,
                            "the job completed without an evaluation",
                            kind="no_evaluation",
                        )
                        return Outcome(number)
                    best = results.best_epoch(epochs)
                    await self._store.run(results.keep_epoch, run.trial_dir, best)
                    await self._store.set_trial_attrs(study, run.trial_id, best_epoch=best.index)
                    if best.index != len(epochs):
                        logger.info(
                            "Trial %d: kept epoch %d of %d (%s %.4f, last epoch %.4f)",
                            number,
                            best.index,
                            len(epochs),
                            best.evaluation.objective_name,
                            best.evaluation.objective,
                            epochs[-1].evaluation.objective,
                        )
                    await self._store.run(study.tell, number, best.evaluation.objective)
                    await self._finished(study, number, started, "complete")
                    await self._completed(run, best.evaluation.objective)
                    return Outcome(number)
                elif isinstance(event, JobFailed):
                    if event.reason == "SHUTDOWN":
                        return await self.interrupted(
                            study,
                            number,
                            f"trainer {run.address} shut down: {event.message}",
                            kind="trainer_shutdown",
                        )
                    await self._job_failed(run, event)
                    # Counted by tell_fail (with the failure's reason); timed and published here.
                    await self._finished(study, number, started, "fail", count=False)
                    return Outcome(number)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _record_excluded(self, run: TrialRun, event: JobDataPrepared) -> list[dict[str, Any]]:
        """Keeps the classes a trial did not train on, on the trial and (once) the study."""
        excluded = [
            {"label": c.label, "train_rows": c.train_rows, "validation_rows": c.validation_rows}
            for c in event.excluded
        ]
        await self._store.set_trial_attrs(run.study, run.trial_id, excluded_classes=excluded)
        record = await self._store.record(run.study.study_name)
        if record.excluded_classes is None:
            await self._store.update(run.study.study_name, excluded_classes=excluded)
            logger.warning("study %s: %s", run.study.study_name, excluded_note(excluded))
        return excluded

    # ---- endings -----------------------------------------------------------------------

    async def _job_failed(self, run: TrialRun, failed: JobFailed) -> None:
        study, number = run.study, run.number
        message = f"{failed.reason}: {failed.message}"
        if failed.reason == "OUT_OF_MEMORY":
            record = await self._store.record(study.study_name)
            key = json.dumps(run.params, sort_keys=True)
            await self._store.update(study.study_name, oom_configs=[*record.oom_configs, key])
            await self.tell_fail(study, number, message, kind="out_of_memory")
        elif failed.reason == "INVALID_INPUT":
            await self.tell_fail(study, number, message, kind="invalid_input")
            await self._store.update(
                study.study_name, fatal=f"the trainer cannot use the data: {failed.message}"
            )
        elif failed.reason == "INTERNAL":
            frozen = await self._store.trial(study, number)
            if frozen.user_attrs.get("previous_failure") == message:
                # The same parameters failed the same way again: not a passing fault.
                await self.tell_fail(study, number, message, kind="internal")
                await self._store.update(
                    study.study_name,
                    fatal=f"trial {number} failed the same way on a retry: {message}",
                )
            else:
                await self._retry(run, message)
        else:
            kind = "nan_loss" if failed.reason == "NAN_LOSS" else "other"
            await self.tell_fail(study, number, message, kind=kind)

    async def interrupted(
        self, study: optuna.Study, number: int, reason: str, *, kind: str = "trainer_lost"
    ) -> Outcome:
        """The trial stopped through no fault of its own: it runs again, uncounted (bounded).

        ``kind`` is the reason's label on the re-runs counter (``INTERRUPTION_REASONS``).
        """
        trial = await self._store.trial(study, number)
        if trial.state.is_finished():
            return Outcome(number)
        attrs = trial.user_attrs
        interruptions = int(attrs.get("interruptions", 0)) + 1
        if interruptions > self._options.max_trial_interruptions:
            await self.tell_fail(
                study,
                number,
                f"interrupted {interruptions} times; last: {reason}",
                kind="interrupted_too_often",
            )
            return Outcome(number)
        await self._store.set_trial_attrs(
            study,
            trial._trial_id,
            interruptions=interruptions,
            interruption_reasons=[*attrs.get("interruption_reasons", []), reason][-10:],
            attempt=int(attrs.get("attempt", 1)) + 1,
            trainer="",
            job_id="",
        )
        label = kind if kind in metrics.INTERRUPTION_REASONS else "trainer_lost"
        metrics.TRIAL_INTERRUPTIONS.labels(reason=label).inc()
        logger.warning("Trial %d interrupted (%s); it runs again", number, reason)
        return Outcome(number, interrupted=True)

    async def tell_fail(
        self,
        study: optuna.Study,
        number: int,
        reason: str,
        *,
        count: bool = True,
        kind: str = "other",
    ) -> None:
        """Marks the trial FAIL with `reason`; a counted failure brings the study's limit near.

        A counted failure is a ``fail`` on the trials counter with ``kind`` (one of
        ``FAILURE_REASONS``) on the failures counter; an uncounted one (its study was
        cancelled) is ``cancelled``.
        """
        trial = await self._store.trial(study, number)
        if trial.state.is_finished():
            return
        try:
            await self._store.set_trial_attrs(study, trial._trial_id, failure_reason=reason)
            await self._store.run(study.tell, number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            # Told meanwhile by another path (a storage call of a cancelled task finishes in
            # its worker thread): its own ending stands.
            if (await self._store.trial(study, number)).state.is_finished():
                return
            raise
        logger.warning("Trial %d failed: %s", number, reason)
        if not count:
            metrics.TRIALS.labels(state="cancelled").inc()
            return
        metrics.TRIALS.labels(state="fail").inc()
        metrics.TRIAL_FAILURES.labels(reason=metrics.failure_label(kind)).inc()
        metrics.trial_ended(study.study_name)
        record = await self._store.record(study.study_name)
        await self._store.update(
            study.study_name, failures=record.failures + 1, last_failure=reason
        )

    async def _retry(self, run: TrialRun, reason: str) -> None:
        """Records the trial FAIL (counted) and enqueues its parameters again (bounded)."""
        await self.tell_fail(run.study, run.number, reason, kind="internal")
        if run.attempt < self._options.max_trial_attempts:
            frozen = await self._store.trial(run.study, run.number)
            kept = {
                k: frozen.user_attrs[k] for k in ("role", "base_model") if k in frozen.user_attrs
            }
            await self._store.run(
                run.study.enqueue_trial,
                run.params,
                user_attrs={"attempt": run.attempt + 1, "previous_failure": reason, **kept},
            )
            logger.info(
                "re-enqueued the parameters of trial %d (attempt %d)", run.number, run.attempt + 1
            )

    async def _finished(
        self, study: optuna.Study, number: int, started: float, state: str, *, count: bool = True
    ) -> None:
        if count:
            metrics.TRIALS.labels(state=state).inc()
            metrics.trial_ended(study.study_name)
        metrics.TRIAL_DURATION.observe(time.monotonic() - started)
        trial = await self._store.trial(study, number)
        self._bus.publish(study.study_name, TrialFinished(await self._store.run(trial_view, trial)))

    async def _completed(self, run: TrialRun, value: float) -> None:
        """The objective histogram and the study's best-so-far gauge."""
        best = await self._store.run(_best_value, run.study)
        metrics.trial_completed(
            run.study.study_name, run.spec.objective_name, value, value if best is None else best
        )


def _epoch_choices(study: optuna.Study, space: SearchSpace) -> tuple[int, ...]:
    """The epochs offered to the sampler: `sampled_epochs`, unless the study's trials were
    drawn with the probe-only point among the choices before (a study created by an earlier
    version, resumed): Optuna refuses another set of choices for a parameter in one study."""
    for frozen in study.get_trials(deepcopy=False):
        distribution = frozen.distributions.get("num_epochs")
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            if PROBE_ONLY in distribution.choices:
                return tuple(space.num_epochs)
            break
    return sampled_epochs(space)


def _twins(
    study: optuna.Study, deciding: str, number: int
) -> tuple[optuna.trial.FrozenTrial | None, optuna.trial.FrozenTrial | None]:
    """The first COMPLETE trial that ran its own job with this `result_key`, and (when there
    is none) the first RUNNING trial other than `number` computing it itself (not waiting
    for a twin of its own, not a taken result): from one read of the trials."""
    running = None
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for frozen in study.get_trials(deepcopy=False, states=states):
        attrs = frozen.user_attrs
        if "same_as" in attrs or attrs.get("result_key") != deciding:
            continue
        if frozen.state == optuna.trial.TrialState.COMPLETE:
            return frozen, None
        if running is None and frozen.number != number and attrs.get("waits_for") is None:
            running = frozen
    return None, running


def _best_value(study: optuna.Study) -> float | None:
    """The study's best value, None while no trial is COMPLETE."""
    try:
        return float(study.best_value)
    except ValueError:
        return None
