"""The optimizer's core: studies in Optuna's storage, trials dispatched to idle trainers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from google.protobuf import json_format

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2
from loratune.optimizer.v1 import optimizer_pb2
from loratune.trainer.v1 import trainer_pb2
from services.common.defaults import TrainingDefaults
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LoratuneError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.names import ensure_under, excerpt, validate_name
from services.optimizer import metrics
from services.optimizer.core import results
from services.optimizer.core.datasets import check_dataset
from services.optimizer.core.ports import (
    EvaluatorPort,
    JudgeCatalog,
    TrainerDiscovery,
    TrainerPort,
)
from services.optimizer.core.space import (
    FloatRange,
    SearchSpace,
    TrialParameters,
    default_space,
    default_trial,
    pin,
    pinned_by_environment,
    suggest,
    validate,
)

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

META = "loratune"  # the study's user attribute holding its record
# Job ids append "-t<trial>-a<attempt>" to the study name; trainers bound ids at 128.
MAX_STUDY_NAME = 100
STATES = optimizer_pb2.StudyState
ACTIVE = ("QUEUED", "RUNNING")


@dataclass(frozen=True)
class OptimizerOptions:
    """Behaviour settings (from OptimizerSettings)."""

    artifact_root: Path
    max_trial_failures: int = 10
    max_trial_attempts: int = 3
    # A trial interrupted through no fault of its own (its trainer stopped or vanished, the
    # optimizer restarted) runs again, uncounted, up to this many times; then it fails.
    max_trial_interruptions: int = 10
    evaluation_retry_seconds: float = 300.0
    poll_seconds: float = 1.0


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _timestamp(value: str | None) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    if value:
        stamp.FromDatetime(datetime.fromisoformat(value))
    return stamp


def _space_from_proto(
    message: optimizer_pb2.SearchSpace,
    classification: bool,
    pinned: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """The request's space over the defaults, with the `pinned` dimensions held fixed."""
    space = default_space(classification)

    def rng(value: optimizer_pb2.FloatRange, current: FloatRange) -> FloatRange:
        if not value.low and not value.high:
            return current
        return FloatRange(value.low, value.high, value.log)

    modules = {c.name: tuple(c.modules) for c in message.target_modules if c.modules}
    choices = tuple(c.name for c in message.target_modules)
    space = SearchSpace(
        rank=tuple(message.rank) or space.rank,
        alpha_multiplier=tuple(message.alpha_multiplier) or space.alpha_multiplier,
        dropout=rng(message.dropout, space.dropout),
        learning_rate=rng(message.learning_rate, space.learning_rate),
        num_epochs=tuple(message.num_epochs) or space.num_epochs,
        target_modules=choices or space.target_modules,
        use_rslora=tuple(message.use_rslora) or space.use_rslora,
        batch_size=tuple(message.batch_size),
        focal_gamma=rng(message.focal_gamma, space.focal_gamma),
        use_class_weights=tuple(message.use_class_weights) or space.use_class_weights,
        use_weighted_sampler=tuple(message.use_weighted_sampler) or space.use_weighted_sampler,
        module_sets=modules,
    )
    return pin(space, pinned or {})


def _searched(message: optimizer_pb2.SearchSpace) -> set[str]:
    """The dimensions the request's search space sets (and so searches, or fixes itself)."""
    searched = {
        name
        for name in ("num_epochs", "batch_size", "use_class_weights", "use_weighted_sampler")
        if len(getattr(message, name))
    }
    for name in ("learning_rate", "focal_gamma"):
        value = getattr(message, name)
        if value.low or value.high:
            searched.add(name)
    return searched


def _sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name in ("", "tpe"):
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=3
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise InvalidArgument(f"unknown sampler '{name}' (tpe, random, gp)", field="sampler")


def _pruner(name: str) -> optuna.pruners.BasePruner:
    if name in ("", "median"):
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise InvalidArgument(
        f"unknown pruner '{name}' (median, hyperband, successive_halving, none)", field="pruner"
    )


def excluded_note(excluded: list[dict[str, Any]]) -> str:
    """How the objective treats the classes not trained on, in words ("" for none)."""
    if not excluded:
        return ""
    rows = sum(int(c["validation_rows"]) for c in excluded)
    shown = ", ".join(
        f"{excerpt(str(c['label']), 40)} ({c['train_rows']} train / {c['validation_rows']} "
        "validation rows)"
        for c in excluded[:10]
    )
    more = f" and {len(excluded) - 10} more" if len(excluded) > 10 else ""
    return (
        f"{len(excluded)} classes not trained on (under MIN_SAMPLES_PER_CLASS training rows, "
        f"or none): {shown}{more}. Their {rows} validation rows stay in the evaluation and "
        "count as misses, so f1_macro includes each such class at F1 0."
    )


def _state_excluded(result: common_pb2.EvaluationResult, excluded: list[dict[str, Any]]) -> None:
    if not excluded or not result.HasField("classification"):
        return
    del result.excluded_classes[:]
    result.excluded_classes.extend(common_pb2.ExcludedClass(**c) for c in excluded)
    result.excluded_note = excluded_note(excluded)


@dataclass(frozen=True)
class _Outcome:
    """How a trial's task ended: done (told, or failed), or interrupted and to run again."""

    number: int
    interrupted: bool = False


async def _cancel_all(tasks: dict[asyncio.Task[_Outcome], str]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Watchers:
    """A study's event log since this process started, and the clients following it."""

    events: list[optimizer_pb2.StudyEvent] = field(default_factory=list)
    waiters: set[asyncio.Event] = field(default_factory=set)

    def publish(self, event: optimizer_pb2.StudyEvent) -> None:
        self.events.append(event)
        for waiter in self.waiters:
            waiter.set()


class TrainerPool:
    """Hands out idle trainers: reachable, not busy, and not already running one of ours."""

    def __init__(self, discovery: TrainerDiscovery, trainers: TrainerPort) -> None:
        self._discovery = discovery
        self._trainers = trainers
        self._in_use: set[str] = set()
        self._lock = asyncio.Lock()

    async def acquire(self) -> str | None:
        """An idle trainer's address, now marked in use; None when there is none."""
        async with self._lock:
            addresses = await self._discovery.addresses()
            idle = busy = unreachable = 0
            chosen = None
            for address in addresses:
                if address in self._in_use:
                    busy += 1
                    continue
                status = await self._trainers.status(address)
                if status is None or status.shutting_down:
                    unreachable += 1
                elif status.busy:
                    busy += 1
                else:
                    idle += 1
                    if chosen is None:
                        chosen = address
            if chosen is not None:
                self._in_use.add(chosen)
                idle -= 1
                busy += 1
            metrics.TRAINERS.labels(state="idle").set(idle)
            metrics.TRAINERS.labels(state="busy").set(busy)
            metrics.TRAINERS.labels(state="unreachable").set(unreachable)
            return chosen

    def claim(self, address: str) -> None:
        """Marks a trainer in use (a reattached trial after a restart)."""
        self._in_use.add(address)

    def release(self, address: str) -> None:
        """The trainer is free again."""
        self._in_use.discard(address)

    async def reachable(self) -> int:
        """How many trainers answer."""
        count = 0
        for address in await self._discovery.addresses():
            if await self._trainers.status(address) is not None:
                count += 1
        return count


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
    ) -> None:
        self._storage = storage
        self._trainers = trainers
        self._evaluator = evaluator
        self._judges = judges
        self._defaults = defaults
        self._options = options
        self.pool = TrainerPool(discovery, trainers)
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._watchers: dict[str, _Watchers] = {}
        self._cancelled: set[str] = set()

    # ---- studies ---------------------------------------------------------------------

    def _load(self, study_id: str) -> optuna.Study:
        if not study_id:
            raise InvalidArgument("must not be empty", field="study_id")
        try:
            return optuna.load_study(study_name=study_id, storage=self._storage)
        except KeyError:
            raise NotFound(f"no study '{study_id}'") from None

    @staticmethod
    def _meta(study: optuna.Study) -> dict[str, Any]:
        meta: dict[str, Any] = study.user_attrs.get(META, {})
        return meta

    def _set_meta(self, study: optuna.Study, **changes: Any) -> dict[str, Any]:
        meta = {**self._meta(study), **changes}
        study.set_user_attr(META, meta)
        return meta

    async def create_study(self, request: optimizer_pb2.CreateStudyRequest) -> optimizer_pb2.Study:
        """Validates, stores and starts a study; the same study_name again is idempotent."""
        params = request.fine_tuning_params
        if request.study_name:
            validate_name(request.study_name, "study_name", max_length=MAX_STUDY_NAME)
        n_trials = params.n_trials or self._defaults.lora_n_trials
        if not 5 <= n_trials <= 100:
            raise InvalidArgument(
                f"must be between 5 and 100 (got {n_trials})", field="fine_tuning_params.n_trials"
            )
        dataset = request.dataset
        task = dataset.task_type
        if task not in (common_pb2.TASK_TYPE_CLASSIFICATION, common_pb2.TASK_TYPE_GENERATION):
            raise InvalidArgument(
                "must be TASK_TYPE_CLASSIFICATION or TASK_TYPE_GENERATION",
                field="dataset.task_type",
            )
        classification = task == common_pb2.TASK_TYPE_CLASSIFICATION
        await asyncio.to_thread(check_dataset, dataset)
        base_model = params.base_model_name or self._defaults.lora_model_name
        looks_local = base_model.startswith((".", "/", "~")) or Path(base_model).exists()
        if looks_local and not Path(base_model).expanduser().exists():
            raise InvalidArgument(
                f"local folder '{base_model}' does not exist",
                field="fine_tuning_params.base_model_name",
            )
        if params.use_llm_judge and classification:
            raise InvalidArgument(
                "the LLM judge scores generated texts; a classification study is scored by "
                "macro-F1, so turn use_llm_judge off",
                field="fine_tuning_params.use_llm_judge",
            )
        if params.use_llm_judge:
            await self._check_judge(params.judge_model_id)
        elif params.judge_model_id:
            validate_name(params.judge_model_id, "fine_tuning_params.judge_model_id")
        pinned = pinned_by_environment(
            self._defaults, _searched(request.search_space), classification
        )
        space = _space_from_proto(request.search_space, classification, pinned)
        validate(space)
        _sampler(request.sampler, 0)
        _pruner(request.pruner)

        filled = optimizer_pb2.FineTuningParams(
            use_llm_judge=params.use_llm_judge,
            judge_model_id=params.judge_model_id,
            base_model_name=base_model,
            n_trials=n_trials,
        )
        fingerprint_source = optimizer_pb2.CreateStudyRequest()
        fingerprint_source.CopyFrom(request)
        fingerprint_source.study_name = ""
        fingerprint_source.fine_tuning_params.CopyFrom(filled)
        fingerprint = hashlib.sha256(
            fingerprint_source.SerializeToString(deterministic=True)
        ).hexdigest()
        study_id = request.study_name or f"study-{request.project_id}-{uuid.uuid4().hex[:8]}"
        # The name becomes the study's folder under the artifact root (and job ids).
        validate_name(study_id, "study_name", max_length=MAX_STUDY_NAME)
        ensure_under(self._options.artifact_root, Path(study_id), "study_name")
        try:
            existing = optuna.load_study(study_name=study_id, storage=self._storage)
        except KeyError:
            existing = None
        if existing is not None:
            if self._meta(existing).get("fingerprint") != fingerprint:
                raise AlreadyExists(
                    f"study '{study_id}' exists with different parameters", field="study_name"
                )
            return self.describe(existing)

        if await self.pool.reachable() == 0:
            # Documented: creation needs at least one reachable trainer, so a
            # misconfigured cluster fails loudly instead of queueing forever.
            raise Unavailable("no trainer is reachable (LORATUNE_TRAINERS or Kubernetes discovery)")

        study = optuna.create_study(
            storage=self._storage, study_name=study_id, direction="maximize"
        )
        self._set_meta(
            study,
            project_id=request.project_id,
            fine_tuning_params=json_format.MessageToDict(filled),
            request=json_format.MessageToDict(request),
            fingerprint=fingerprint,
            state="QUEUED",
            create_time=_now(),
            objective_name="f1_macro" if classification else "combined",
            failures=0,
            oom_configs=[],
            # Held for every trial, whatever this process's environment is after a restart.
            pinned=pinned,
            training_defaults={
                "gradient_accumulation": self._defaults.gradient_accumulation,
                "max_seq_length": self._defaults.max_seq_length,
                "min_samples_per_class": self._defaults.min_samples_per_class,
            },
        )
        if pinned:
            logger.info("study %s: fixed by the environment for every trial: %s", study_id, pinned)
        first = default_trial(space, self._defaults, classification)
        study.enqueue_trial(first, user_attrs={"attempt": 1})
        logger.info("created study %s (%d trials, base model %s)", study_id, n_trials, base_model)
        self._start_runner(study_id)
        return self.describe(study)

    async def _check_judge(self, judge_id: str) -> None:
        field = "fine_tuning_params.judge_model_id"
        if judge_id:
            validate_name(judge_id, field)
        if self._judges is None:
            raise FailedPrecondition(
                "the LLM judge is requested but no judge gateway is configured "
                "(set LORATUNE_JUDGE_ADDRESS)",
                field="fine_tuning_params.use_llm_judge",
            )
        models = await self._judges.models()
        ids = [m.id for m in models]
        chosen = next((m for m in models if m.id == judge_id), None) if judge_id else None
        if judge_id and chosen is None:
            raise NotFound(
                f"LLM Judge model not found: '{excerpt(judge_id)}' (available: {', '.join(ids)})"
            )
        if chosen is None:
            chosen = next((m for m in models if m.is_default), None)
        if chosen is None:
            raise FailedPrecondition("the judge gateway has no default judge model", field=field)
        if not chosen.available:
            raise FailedPrecondition(
                f"judge model '{chosen.id}' has no credentials at the judge gateway (set its "
                f"provider's key there, or choose one of: "
                f"{', '.join(m.id for m in models if m.available) or 'none available'})",
                field=field,
            )

    def describe(self, study: optuna.Study) -> optimizer_pb2.Study:
        """A study as the contract's message."""
        meta = self._meta(study)
        trials = study.get_trials(deepcopy=False)
        counts = {state: 0 for state in optuna.trial.TrialState}
        for trial in trials:
            counts[trial.state] += 1
        message = optimizer_pb2.Study(
            study_id=study.study_name,
            project_id=int(meta.get("project_id", 0)),
            state=STATES.Value(f"STUDY_STATE_{meta.get('state', 'QUEUED')}"),
            fine_tuning_params=json_format.ParseDict(
                meta.get("fine_tuning_params", {}), optimizer_pb2.FineTuningParams()
            ),
            dataset=json_format.ParseDict(
                meta.get("request", {}).get("dataset", {}), common_pb2.DatasetSpec()
            ),
            trials_complete=counts[optuna.trial.TrialState.COMPLETE],
            trials_pruned=counts[optuna.trial.TrialState.PRUNED],
            trials_failed=counts[optuna.trial.TrialState.FAIL],
            trials_running=counts[optuna.trial.TrialState.RUNNING],
            trials_waiting=counts[optuna.trial.TrialState.WAITING],
            create_time=_timestamp(meta.get("create_time")),
            failure_reason=meta.get("failure_reason", ""),
            best_model_dir=meta.get("best_model_dir", ""),
            objective_name=meta.get("objective_name", ""),
            excluded_classes=[
                common_pb2.ExcludedClass(**c) for c in meta.get("excluded_classes", [])
            ],
            excluded_note=excluded_note(meta.get("excluded_classes", [])),
        )
        if meta.get("start_time"):
            message.start_time.CopyFrom(_timestamp(meta["start_time"]))
        if meta.get("end_time"):
            message.end_time.CopyFrom(_timestamp(meta["end_time"]))
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
            message.best_trial.CopyFrom(self._trial_message(study, best))
        return message

    def _trial_message(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> optimizer_pb2.Trial:
        attrs = trial.user_attrs
        state = {
            optuna.trial.TrialState.RUNNING: optimizer_pb2.TRIAL_STATE_RUNNING,
            optuna.trial.TrialState.COMPLETE: optimizer_pb2.TRIAL_STATE_COMPLETE,
            optuna.trial.TrialState.PRUNED: optimizer_pb2.TRIAL_STATE_PRUNED,
            optuna.trial.TrialState.FAIL: optimizer_pb2.TRIAL_STATE_FAIL,
            optuna.trial.TrialState.WAITING: optimizer_pb2.TRIAL_STATE_WAITING,
        }[trial.state]
        message = optimizer_pb2.Trial(
            number=trial.number,
            state=state,
            artifact_dir=attrs.get("artifact_dir", ""),
            trainer=attrs.get("trainer", ""),
            attempt=int(attrs.get("attempt", 1)),
            failure_reason=attrs.get("failure_reason", ""),
            best_epoch=int(attrs.get("best_epoch", 0)),
            epoch_objectives=[float(e["objective"]) for e in attrs.get("epochs", [])],
            interruptions=list(attrs.get("interruption_reasons", [])),
        )
        if "hyperparameters" in attrs:
            message.hyperparameters.CopyFrom(
                json_format.ParseDict(attrs["hyperparameters"], common_pb2.Hyperparameters())
            )
        if trial.datetime_start:
            message.start_time.FromDatetime(trial.datetime_start)
        if trial.datetime_complete:
            message.end_time.FromDatetime(trial.datetime_complete)
        if trial.value is not None:
            message.objective = trial.value
        if message.artifact_dir:
            evaluation = results.read_evaluation(Path(message.artifact_dir))
            if evaluation is not None:
                message.evaluation.CopyFrom(evaluation)
        return message

    def get_study(self, study_id: str) -> optimizer_pb2.Study:
        """One study."""
        return self.describe(self._load(study_id))

    def list_studies(self, project_id: int) -> list[optimizer_pb2.Study]:
        """Studies, newest first, optionally of one project."""
        out = []
        for summary in optuna.get_all_study_summaries(self._storage, include_best_trial=False):
            meta = summary.user_attrs.get(META)
            if meta is None or (project_id and int(meta.get("project_id", 0)) != project_id):
                continue
            out.append(self.get_study(summary.study_name))
        return sorted(out, key=lambda s: s.create_time.ToDatetime(), reverse=True)

    def list_trials(self, study_id: str) -> list[optimizer_pb2.Trial]:
        """The study's trials by number."""
        study = self._load(study_id)
        return [self._trial_message(study, t) for t in study.get_trials(deepcopy=False)]

    async def cancel_study(self, study_id: str) -> optimizer_pb2.Study:
        """Cancels a running or queued study and its jobs; a finished one is refused."""
        study = self._load(study_id)
        state = self._meta(study).get("state", "QUEUED")
        if state not in ACTIVE:
            raise FailedPrecondition(f"study '{study_id}' is already {state.lower()}")
        self._cancelled.add(study_id)
        self._set_meta(
            study, state="CANCELLED", end_time=_now(), failure_reason="cancelled by a client"
        )
        runner = self._runners.get(study_id)
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        # The runner is gone; its trials' jobs are not: tell their trainers to stop them (a
        # trial dispatched during the cancel recorded its job before sending it).
        await self._cancel_jobs(study)
        self._finish_running_trials(study, "study cancelled")
        self._emit_finished(study)
        return self.describe(study)

    async def _cancel_jobs(self, study: optuna.Study) -> None:
        jobs = [
            (t.user_attrs.get("trainer", ""), t.user_attrs.get("job_id", ""))
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        ]
        stops = [self._trainers.cancel(address, job) for address, job in jobs if address and job]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
            logger.info(
                "asked %d trainers to stop the jobs of study %s", len(stops), study.study_name
            )

    def _finish_running_trials(self, study: optuna.Study, reason: str) -> None:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)

    async def watch(self, study_id: str) -> AsyncIterator[optimizer_pb2.StudyEvent]:
        """The study's events since this process started, then live, until it finishes."""
        study = self._load(study_id)
        watchers = self._watchers.setdefault(study_id, _Watchers())
        if self._meta(study).get("state") not in ACTIVE and not watchers.events:
            yield self._finished_event(study)
            return
        waiter = asyncio.Event()
        watchers.waiters.add(waiter)
        try:
            sent = 0
            while True:
                waiter.clear()
                while sent < len(watchers.events):
                    event = watchers.events[sent]
                    sent += 1
                    yield event
                    if event.WhichOneof("event") == "study_finished":
                        return
                await waiter.wait()
        finally:
            watchers.waiters.discard(waiter)

    def _publish(self, study_id: str, **kwargs: Any) -> None:
        event = optimizer_pb2.StudyEvent(study_id=study_id, **kwargs)
        event.time.GetCurrentTime()
        self._watchers.setdefault(study_id, _Watchers()).publish(event)

    def _finished_event(self, study: optuna.Study) -> optimizer_pb2.StudyEvent:
        event = optimizer_pb2.StudyEvent(
            study_id=study.study_name,
            study_finished=optimizer_pb2.StudyFinished(study=self.describe(study)),
        )
        event.time.GetCurrentTime()
        return event

    def _emit_finished(self, study: optuna.Study) -> None:
        self._watchers.setdefault(study.study_name, _Watchers()).publish(
            self._finished_event(study)
        )
        self._update_study_gauge()

    def _update_study_gauge(self) -> None:
        counts = dict.fromkeys(("QUEUED", "RUNNING", "COMPLETED", "CANCELLED", "FAILED"), 0)
        for summary in optuna.get_all_study_summaries(self._storage, include_best_trial=False):
            state = summary.user_attrs.get(META, {}).get("state")
            if state in counts:
                counts[state] += 1
        for state, value in counts.items():
            metrics.STUDIES.labels(state=state.lower()).set(value)

    # ---- running ---------------------------------------------------------------------

    def _start_runner(self, study_id: str) -> None:
        if study_id in self._runners and not self._runners[study_id].done():
            return
        task = asyncio.create_task(self._run_study(study_id), name=f"study-{study_id}")
        self._runners[study_id] = task
        task.add_done_callback(lambda _: self._runners.pop(study_id, None))

    async def resume_all(self) -> None:
        """After a restart: every unfinished study continues from storage alone."""
        for summary in optuna.get_all_study_summaries(self._storage, include_best_trial=False):
            meta = summary.user_attrs.get(META)
            if meta and meta.get("state") in ACTIVE:
                logger.info("resuming study %s", summary.study_name)
                self._start_runner(summary.study_name)
        self._update_study_gauge()

    async def shutdown(self) -> None:
        """Stops the runners without touching storage (a restart resumes them)."""
        for task in list(self._runners.values()):
            task.cancel()
        await asyncio.gather(*self._runners.values(), return_exceptions=True)

    async def _run_study(self, study_id: str) -> None:
        study = self._load(study_id)
        meta = self._meta(study)
        request = json_format.ParseDict(meta["request"], optimizer_pb2.CreateStudyRequest())
        n_trials = int(meta["fine_tuning_params"]["nTrials"])
        classification = request.dataset.task_type == common_pb2.TASK_TYPE_CLASSIFICATION
        space = _space_from_proto(request.search_space, classification, meta.get("pinned", {}))
        sampler = _sampler(request.sampler, seed=int(request.dataset.seed or 0))
        study = optuna.load_study(
            study_name=study_id,
            storage=self._storage,
            sampler=sampler,
            pruner=_pruner(request.pruner),
        )
        running: dict[asyncio.Task[_Outcome], str] = {}
        # Trials interrupted through no fault of their own, waiting for a trainer to run on.
        pending: list[int] = []
        try:
            # Trials a previous process left running: reattach to their job, or run again.
            for trial in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            ):
                address = trial.user_attrs.get("trainer", "")
                if not address or not trial.user_attrs.get("job_id"):
                    pending.append(trial.number)
                    continue
                self.pool.claim(address)
                task = asyncio.create_task(
                    self._reattach(study, request, trial.number, trial.user_attrs, classification)
                )
                running[task] = address
            waiting_said = False
            while True:
                meta = self._meta(study)
                if study_id in self._cancelled or meta.get("state") == "CANCELLED":
                    return
                finished = len(
                    study.get_trials(
                        deepcopy=False,
                        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED),
                    )
                )
                if finished >= n_trials and not running and not pending:
                    await self._complete(study)
                    return
                if int(meta.get("failures", 0)) >= self._options.max_trial_failures:
                    await _cancel_all(running)
                    self._fail(
                        study,
                        f"{meta['failures']} trials failed; last: {meta.get('last_failure', '')}",
                    )
                    return
                if meta.get("fatal"):
                    await _cancel_all(running)
                    self._fail(study, meta["fatal"])
                    return
                limit = request.max_parallel_trials or 1_000
                address = None
                wanted = pending or finished + len(running) < n_trials
                if wanted and len(running) < limit:
                    address = await self.pool.acquire()
                    if address is None and not running and not waiting_said:
                        logger.info("study %s waits for an idle trainer", study_id)
                        waiting_said = True
                if address is not None:
                    waiting_said = False
                    if meta.get("state") == "QUEUED":
                        self._set_meta(study, state="RUNNING", start_time=_now())
                        self._update_study_gauge()
                    if pending:
                        number = pending.pop(0)
                        task = asyncio.create_task(
                            self._dispatch(study, request, number, address, classification)
                        )
                    else:
                        task = asyncio.create_task(
                            self._new_trial(study, request, space, classification, address)
                        )
                    running[task] = address
                    continue
                waiting: list[asyncio.Task[Any]] = list(running) or [
                    asyncio.create_task(asyncio.sleep(self._options.poll_seconds))
                ]
                done, _ = await asyncio.wait(
                    waiting, timeout=self._options.poll_seconds, return_when=asyncio.FIRST_COMPLETED
                )
                for finished_task in done:
                    if finished_task not in running:
                        continue
                    task = finished_task
                    self.pool.release(running.pop(task))
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
            for address in running.values():
                self.pool.release(address)

    async def _new_trial(
        self,
        study: optuna.Study,
        request: optimizer_pb2.CreateStudyRequest,
        space: SearchSpace,
        classification: bool,
        address: str,
    ) -> _Outcome:
        meta = self._meta(study)
        trial = study.ask()
        params = suggest(trial, space, self._defaults, classification)
        key = json.dumps(trial.params, sort_keys=True)
        if key in meta.get("oom_configs", []):
            trial.set_user_attr("failure_reason", "skipped: this configuration ran out of memory")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return _Outcome(trial.number)
        hyper = self._hyperparameters(request, params, meta.get("training_defaults", {}))
        trial_dir = self._options.artifact_root / study.study_name / f"trial-{trial.number}"
        for name, value in (
            ("attempt", int(trial.user_attrs.get("attempt", 1))),
            ("artifact_dir", str(trial_dir.resolve())),
            ("hyperparameters", json_format.MessageToDict(hyper)),
            ("params_key", key),
        ):
            trial.set_user_attr(name, value)
        logger.info("Trial %d: params=%s", trial.number, params.as_log_dict())
        return await self._dispatch(study, request, trial.number, address, classification)

    async def _dispatch(
        self,
        study: optuna.Study,
        request: optimizer_pb2.CreateStudyRequest,
        number: int,
        address: str,
        classification: bool,
    ) -> _Outcome:
        """Sends a trial (new, or interrupted before) to the trainer at `address` and follows it."""
        frozen = study.get_trials(deepcopy=False)[number]
        attrs = frozen.user_attrs
        attempt = int(attrs.get("attempt", 1))
        job_id = f"{study.study_name}-t{number}-a{attempt}"
        storage = study._storage
        storage.set_trial_user_attr(frozen._trial_id, "job_id", job_id)
        storage.set_trial_user_attr(frozen._trial_id, "trainer", address)
        logger.info("Trial %d (attempt %d) dispatched to %s", number, attempt, address)
        self._publish(
            study.study_name,
            trial_started=optimizer_pb2.TrialStarted(
                trial=self._trial_message(study, storage.get_trial(frozen._trial_id))
            ),
        )
        trial_dir = attrs.get("artifact_dir", "")
        start = trainer_pb2.StartTrainingRequest(
            job_id=job_id,
            base_model=self._meta(study)["fine_tuning_params"]["baseModelName"],
            dataset=request.dataset,
            hyperparameters=json_format.ParseDict(
                attrs.get("hyperparameters", {}), common_pb2.Hyperparameters()
            ),
            output_dir=trial_dir,
            max_eval_samples=request.max_eval_samples,
        )
        try:
            await self._trainers.start(address, start)
        except ResourceExhausted:
            metrics.DISPATCH_ERRORS.labels(reason="busy").inc()
            return self._interrupted(study, number, f"trainer {address} was busy")
        except Unavailable as err:
            metrics.DISPATCH_ERRORS.labels(reason="unavailable").inc()
            return self._interrupted(study, number, f"trainer {address} unavailable: {err}")
        except InvalidArgument as err:
            metrics.DISPATCH_ERRORS.labels(reason="invalid").inc()
            self._tell_fail(study, number, str(err))
            self._set_meta(study, fatal=f"the trainer refused the job: {err}")
            return _Outcome(number)
        return await self._follow(
            study, request, number, job_id, address, dict(frozen.params), attempt, classification
        )

    def _interrupted(self, study: optuna.Study, number: int, reason: str) -> _Outcome:
        """The trial stopped through no fault of its own: it runs again, uncounted (bounded)."""
        trial = study.get_trials(deepcopy=False)[number]
        if trial.state.is_finished():
            return _Outcome(number)
        attrs = trial.user_attrs
        interruptions = int(attrs.get("interruptions", 0)) + 1
        storage = study._storage
        if interruptions > self._options.max_trial_interruptions:
            self._tell_fail(
                study, number, f"interrupted {interruptions} times; last: {reason}", count=True
            )
            return _Outcome(number)
        history = [*attrs.get("interruption_reasons", []), reason][-10:]
        for name, value in (
            ("interruptions", interruptions),
            ("interruption_reasons", history),
            ("attempt", int(attrs.get("attempt", 1)) + 1),
            ("trainer", ""),
            ("job_id", ""),
        ):
            storage.set_trial_user_attr(trial._trial_id, name, value)
        metrics.TRIAL_INTERRUPTIONS.inc()
        logger.warning("Trial %d interrupted (%s); it runs again", number, reason)
        return _Outcome(number, interrupted=True)

    def _hyperparameters(
        self,
        request: optimizer_pb2.CreateStudyRequest,
        params: TrialParameters,
        stored: Mapping[str, Any],
    ) -> common_pb2.Hyperparameters:
        """A trial's hyperparameters: the sampled ones, the request's fixed training settings,
        and the environment's defaults as they were when the study was created (`stored`)."""
        fixed = request.training

        def default(name: str) -> Any:
            return stored.get(name, getattr(self._defaults, name))

        return common_pb2.Hyperparameters(
            lora=common_pb2.LoraParams(
                rank=params.rank,
                alpha=params.alpha,
                dropout=params.dropout,
                target_modules=list(params.target_modules),
                use_rslora=params.use_rslora,
            ),
            training=common_pb2.TrainingParams(
                learning_rate=params.learning_rate,
                num_epochs=params.num_epochs,
                batch_size=params.batch_size,
                gradient_accumulation=fixed.gradient_accumulation
                or default("gradient_accumulation"),
                max_seq_length=fixed.max_seq_length or default("max_seq_length"),
                warmup_ratio=fixed.warmup_ratio,
                weight_decay=fixed.weight_decay,
                quantize_4bit=fixed.quantize_4bit,
                seed=fixed.seed or request.dataset.seed,
            ),
            balancing=common_pb2.BalancingParams(
                focal_gamma=params.focal_gamma,
                use_class_weights=params.use_class_weights,
                use_weighted_sampler=params.use_weighted_sampler,
                min_samples_per_class=default("min_samples_per_class"),
            ),
        )

    async def _reattach(
        self,
        study: optuna.Study,
        request: optimizer_pb2.CreateStudyRequest,
        number: int,
        attrs: dict[str, Any],
        classification: bool,
    ) -> _Outcome:
        trial = study.get_trials(deepcopy=False)[number]
        job_id, address = attrs.get("job_id", ""), attrs.get("trainer", "")
        attempt = int(attrs.get("attempt", 1))
        logger.info("reattaching trial %d to job %s on %s", number, job_id, address)
        return await self._follow(
            study, request, number, job_id, address, dict(trial.params), attempt, classification
        )

    async def _follow(
        self,
        study: optuna.Study,
        request: optimizer_pb2.CreateStudyRequest,
        number: int,
        job_id: str,
        address: str,
        params: dict[str, Any],
        attempt: int,
        classification: bool,
    ) -> _Outcome:
        """Follows the job's events to the trial's end: evaluate, report, prune, tell.

        The trial's value is its best epoch's objective, and the adapter kept in its folder
        is that epoch's; every epoch's evaluation stays on record (`epochs` in the trial's
        attributes, `evaluation_curve.json` in its folder).
        """
        started = time.monotonic()
        frozen = study.get_trials(deepcopy=False)[number]
        trial_dir = Path(frozen.user_attrs.get("artifact_dir", ""))
        trial = optuna.Trial(study, frozen._trial_id)
        epochs: list[results.EpochResult] = []
        excluded: list[dict[str, Any]] = list(frozen.user_attrs.get("excluded_classes", []))
        # After a restart the replayed evaluations were reported before: not again.
        reported = set(frozen.intermediate_values)
        judge = evaluator_pb2.JudgeOptions(
            enabled=self._meta(study)["fine_tuning_params"].get("useLlmJudge", False),
            judge_model_id=self._meta(study)["fine_tuning_params"].get("judgeModelId", ""),
            seed=request.dataset.seed,
        )
        if request.judge_sample_size:
            judge.sample_size = request.judge_sample_size
        events = self._trainers.watch(address, job_id)
        try:
            while True:
                try:
                    event = await anext(events, None)
                except LoratuneError as err:
                    # NOT_FOUND after a trainer (or optimizer) restart, UNAVAILABLE or a broken
                    # stream when it died: not the trial's fault; its parameters run again.
                    metrics.DISPATCH_ERRORS.labels(reason="trainer_lost").inc()
                    return self._interrupted(study, number, f"trainer {address} lost: {err}")
                if event is None:
                    return self._interrupted(study, number, f"trainer {address} stopped answering")
                kind = event.WhichOneof("event")
                if kind == "dataset_prepared" and event.dataset_prepared.excluded:
                    excluded = self._record_excluded(study, frozen._trial_id, event)
                elif kind == "progress":
                    p = event.progress
                    self._publish(
                        study.study_name,
                        trial_progress=optimizer_pb2.TrialProgress(
                            number=number,
                            epoch=p.epoch,
                            step=p.step,
                            total_steps=p.total_steps,
                            loss=p.loss,
                        ),
                    )
                elif kind == "evaluation":
                    point = event.evaluation
                    try:
                        result = await self._evaluate(point, classification, judge)
                        _state_excluded(result, excluded)
                    except LoratuneError as err:
                        # The evaluator refused (a bad judge, bad input) or stayed away past the
                        # retry budget: the study cannot be scored, so it stops with the reason.
                        self._tell_fail(study, number, f"evaluation failed: {err}")
                        self._set_meta(study, fatal=f"evaluation failed: {err}")
                        await self._trainers.cancel(address, job_id)
                        return _Outcome(number)
                    epoch = results.EpochResult(
                        index=len(epochs) + 1,
                        epoch=point.epoch,
                        eval_loss=point.eval_loss,
                        adapter_dir=point.adapter_dir,
                        result=result,
                    )
                    epochs.append(epoch)
                    results.write_evaluation(trial_dir, result, epoch.index)
                    results.write_curve(trial_dir, epochs)
                    study._storage.set_trial_user_attr(
                        frozen._trial_id, "epochs", [e.record() for e in epochs]
                    )
                    self._log_evaluation(number, params, result)
                    self._publish(
                        study.study_name,
                        trial_evaluated=optimizer_pb2.TrialEvaluated(
                            number=number, epoch=point.epoch, evaluation=result
                        ),
                    )
                    if epoch.index not in reported:
                        trial.report(result.objective, epoch.index)
                    if trial.should_prune():
                        await self._trainers.cancel(address, job_id)
                        study.tell(number, state=optuna.trial.TrialState.PRUNED)
                        self._trial_finished(study, number, started, "pruned")
                        return _Outcome(number)
                elif kind == "completed":
                    if not epochs:
                        self._tell_fail(study, number, "the job completed without an evaluation")
                        return _Outcome(number)
                    best = results.best_epoch(epochs)
                    results.keep_epoch(trial_dir, best)
                    study._storage.set_trial_user_attr(frozen._trial_id, "best_epoch", best.index)
                    if best.index != len(epochs):
                        logger.info(
                            "Trial %d: kept epoch %d of %d (%s %.4f, last epoch %.4f)",
                            number,
                            best.index,
                            len(epochs),
                            best.result.objective_name,
                            best.result.objective,
                            epochs[-1].result.objective,
                        )
                    study.tell(number, best.result.objective)
                    self._trial_finished(study, number, started, "complete")
                    return _Outcome(number)
                elif kind == "failed":
                    if event.failed.reason == trainer_pb2.FAILURE_REASON_SHUTDOWN:
                        return self._interrupted(
                            study, number, f"trainer {address} shut down: {event.failed.message}"
                        )
                    self._job_failed(study, number, params, attempt, event.failed)
                    self._trial_finished(study, number, started, "fail")
                    return _Outcome(number)
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def _record_excluded(
        self, study: optuna.Study, trial_id: int, event: trainer_pb2.TrainingEvent
    ) -> list[dict[str, Any]]:
        """Keeps the classes a trial did not train on, on the trial and (once) the study."""
        excluded = [
            {"label": c.label, "train_rows": c.train_rows, "validation_rows": c.validation_rows}
            for c in event.dataset_prepared.excluded
        ]
        study._storage.set_trial_user_attr(trial_id, "excluded_classes", excluded)
        if "excluded_classes" not in self._meta(study):
            self._set_meta(study, excluded_classes=excluded)
            logger.warning("study %s: %s", study.study_name, excluded_note(excluded))
        return excluded

    async def _evaluate(
        self,
        point: trainer_pb2.EvaluationPoint,
        classification: bool,
        judge: evaluator_pb2.JudgeOptions,
    ) -> common_pb2.EvaluationResult:
        request = evaluator_pb2.EvaluateRequest(
            task_type=common_pb2.TASK_TYPE_CLASSIFICATION
            if classification
            else common_pb2.TASK_TYPE_GENERATION,
            predictions=point.predictions,
            references=point.references,
            prompts=point.prompts,
            labels=point.labels,
        )
        if not classification:
            request.judge.CopyFrom(judge)
        deadline = time.monotonic() + self._options.evaluation_retry_seconds
        delay = 0.5
        while True:
            try:
                return await self._evaluator.evaluate(request)
            except Unavailable:
                # The predictions are kept in `point`: retry until the evaluator is back.
                if time.monotonic() + delay > deadline:
                    raise
                metrics.EVALUATION_RETRIES.inc()
                logger.warning("evaluator unavailable; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    def _log_evaluation(
        self, number: int, params: dict[str, Any], result: common_pb2.EvaluationResult
    ) -> None:
        if result.HasField("classification"):
            c = result.classification
            logger.info("Trial %d: params=%s, F1 macro=%.4f", number, params, c.f1_macro)
            logger.info(
                "Detailed evaluation: Accuracy=%.4f, F1 macro=%.4f, F1 micro=%.4f",
                c.accuracy,
                c.f1_macro,
                c.f1_micro,
            )
        else:
            logger.info("Trial %d: params=%s, BERTScore=%.4f", number, params, result.bertscore.f1)
            if result.HasField("judge"):
                logger.info(
                    "Detailed evaluation: BERTScore=%.4f, LLM Judge=%.2f, Combined=%.4f",
                    result.bertscore.f1,
                    result.judge.mean_score,
                    result.combined_score,
                )
            else:
                logger.info(
                    "Detailed evaluation: BERTScore=%.4f, Combined=%.4f",
                    result.bertscore.f1,
                    result.combined_score,
                )

    def _job_failed(
        self,
        study: optuna.Study,
        number: int,
        params: dict[str, Any],
        attempt: int,
        failed: trainer_pb2.Failed,
    ) -> None:
        reason = trainer_pb2.FailureReason.Name(failed.reason).removeprefix("FAILURE_REASON_")
        message = f"{reason}: {failed.message}"
        if failed.reason == trainer_pb2.FAILURE_REASON_OUT_OF_MEMORY:
            meta = self._meta(study)
            self._set_meta(
                study,
                oom_configs=[*meta.get("oom_configs", []), json.dumps(params, sort_keys=True)],
            )
            self._tell_fail(study, number, message)
        elif failed.reason == trainer_pb2.FAILURE_REASON_INVALID_INPUT:
            self._tell_fail(study, number, message)
            self._set_meta(study, fatal=f"the trainer cannot use the data: {failed.message}")
        elif failed.reason == trainer_pb2.FAILURE_REASON_INTERNAL:
            self._retry_trial(study, number, params, attempt, message)
        else:
            self._tell_fail(study, number, message)

    def _tell_fail(self, study: optuna.Study, number: int, reason: str, count: bool = True) -> None:
        trial = study.get_trials(deepcopy=False)[number]
        if trial.state.is_finished():
            return
        study._storage.set_trial_user_attr(trial._trial_id, "failure_reason", reason)
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        logger.warning("Trial %d failed: %s", number, reason)
        if count:
            meta = self._meta(study)
            self._set_meta(study, failures=int(meta.get("failures", 0)) + 1, last_failure=reason)

    def _retry_trial(
        self,
        study: optuna.Study,
        number: int,
        params: dict[str, Any],
        attempt: int,
        reason: str,
        count: bool = True,
    ) -> None:
        """Records the trial FAIL and enqueues the same parameters again (bounded)."""
        self._tell_fail(study, number, reason, count=count)
        if attempt < self._options.max_trial_attempts or not count:
            study.enqueue_trial(params, user_attrs={"attempt": attempt + (1 if count else 0)})
            logger.info("re-enqueued the parameters of trial %d (attempt %d)", number, attempt + 1)

    def _trial_finished(self, study: optuna.Study, number: int, started: float, state: str) -> None:
        metrics.TRIALS.labels(state=state).inc()
        metrics.TRIAL_DURATION.observe(time.monotonic() - started)
        trial = study.get_trials(deepcopy=False)[number]
        self._publish(
            study.study_name,
            trial_finished=optimizer_pb2.TrialFinished(trial=self._trial_message(study, trial)),
        )

    def _fail(self, study: optuna.Study, reason: str) -> None:
        logger.error("study %s failed: %s", study.study_name, reason)
        self._set_meta(study, state="FAILED", end_time=_now(), failure_reason=reason)
        self._emit_finished(study)

    async def _complete(self, study: optuna.Study) -> None:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        best_dir = ""
        if complete:
            best = max(complete, key=lambda t: t.value if t.value is not None else float("-inf"))
            source = Path(best.user_attrs.get("artifact_dir", ""))
            if source.is_dir():
                target = results.publish_best(
                    source, self._options.artifact_root / "models", study.study_name
                )
                best_dir = str(target)
                results.write_study_summary(target, self._summary(study, best.number))
            logger.info(
                "study %s completed: best trial %d, %s=%.4f, published to %s",
                study.study_name,
                best.number,
                self._meta(study).get("objective_name"),
                best.value or 0.0,
                best_dir,
            )
        self._set_meta(study, state="COMPLETED", end_time=_now(), best_model_dir=best_dir)
        self._emit_finished(study)

    def _summary(self, study: optuna.Study, best_number: int) -> dict[str, Any]:
        meta = self._meta(study)
        return {
            "study_id": study.study_name,
            "project_id": meta.get("project_id"),
            "objective_name": meta.get("objective_name"),
            "best_trial": best_number,
            "fine_tuning_params": meta.get("fine_tuning_params"),
            "pinned_by_environment": meta.get("pinned", {}),
            "excluded_classes": meta.get("excluded_classes", []),
            "excluded_note": excluded_note(meta.get("excluded_classes", [])),
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
                for t in study.get_trials(deepcopy=False)
            ],
        }
