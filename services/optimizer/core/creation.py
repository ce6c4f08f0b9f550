"""Creating a study: the request checked as far as it can be before anything runs.

A request without a dataset first takes its project's data and defaults (`projects.py`).
Then files, fields and ranges of the dataset (`datasets.py`), the base model's folder, the
judge (known, with credentials at the gateway), the search space, the sampler and the
pruner; then the defaults filled in and the environment's pins applied (`space.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from services.common.defaults import TrainingDefaults
from services.common.durations import MAX_DURATION_SECONDS as MAX_TIME_BUDGET_SECONDS
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.names import MAX_PATH_LENGTH, escape_control, excerpt, validate_name
from services.optimizer.core.datasets import check_dataset
from services.optimizer.core.ports import JudgeCatalog
from services.optimizer.core.projects import ProjectCatalog, with_project
from services.optimizer.core.records import (
    FineTuning,
    Hyperparameters,
    StudyRecord,
    StudyRequest,
    StudySpec,
    searched_dimensions,
    space_from_request,
)
from services.optimizer.core.space import (
    PROBE_ONLY,
    TrialParameters,
    pinned_by_environment,
    validate,
)


def sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler by name: tpe (default), random or gp."""
    if name in ("", "tpe"):
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True, n_startup_trials=3
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise InvalidArgument(f"unknown sampler '{excerpt(name)}' (tpe, random, gp)", field="sampler")


def pruner(name: str) -> optuna.pruners.BasePruner:
    """The study's pruner by name: median (default), hyperband, successive_halving, none."""
    if name in ("", "median"):
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise InvalidArgument(
        f"unknown pruner '{excerpt(name)}' (median, hyperband, successive_halving, none)",
        field="pruner",
    )


def fingerprint(spec: StudySpec) -> str:
    """What makes two requests "the same study" (the environment's pins aside)."""
    content = StudyRecord(spec=spec).to_storage()["spec"]
    for derived in ("pinned", "training_defaults"):
        content.pop(derived)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class StudyCreation:
    """Turns a request into a study's spec, or refuses it with the field named."""

    def __init__(
        self,
        judges: JudgeCatalog | None,
        defaults: TrainingDefaults,
        projects: ProjectCatalog | None = None,
    ) -> None:
        self._judges = judges
        self._defaults = defaults
        self._projects = projects or ProjectCatalog(None)

    async def spec(self, request: StudyRequest) -> StudySpec:
        """The request checked as far as it can be before anything runs, defaults filled."""
        # The projects file may be read again (when it changed): not on the event loop.
        request, dataset = await asyncio.to_thread(with_project, request, self._projects)
        fine = request.fine_tuning
        n_trials = fine.n_trials or self._defaults.lora_n_trials
        if not 5 <= n_trials <= 100:
            raise InvalidArgument(
                f"must be between 5 and 100 (got {n_trials})", field="fine_tuning_params.n_trials"
            )
        if not 0 <= fine.time_budget_seconds <= MAX_TIME_BUDGET_SECONDS:
            raise InvalidArgument(
                f"must be between 0 (none) and {MAX_TIME_BUDGET_SECONDS} seconds (30 days), "
                f"got {fine.time_budget_seconds}",
                field="fine_tuning_params.time_budget_seconds",
            )
        await asyncio.to_thread(check_dataset, dataset)
        base_model = fine.base_model_name or self._defaults.lora_model_name
        _check_base(base_model, "fine_tuning_params.base_model_name")
        if len(fine.base_model_names) > 4 * MAX_EXTRA_BASES:
            raise InvalidArgument(
                f"at most {MAX_EXTRA_BASES} more base models, got {len(fine.base_model_names)}",
                field="fine_tuning_params.base_model_names",
            )
        others: list[str] = []
        for i, name in enumerate(fine.base_model_names):
            _check_base(name, f"fine_tuning_params.base_model_names[{i}]")
            if name != base_model and name not in others:
                others.append(name)
        if len(others) > MAX_EXTRA_BASES:
            raise InvalidArgument(
                f"at most {MAX_EXTRA_BASES} more base models, got {len(others)}",
                field="fine_tuning_params.base_model_names",
            )
        if fine.use_llm_judge and dataset.classification:
            raise InvalidArgument(
                "the LLM judge scores generated texts; a classification study is scored by "
                "macro-F1, so turn use_llm_judge off",
                field="fine_tuning_params.use_llm_judge",
            )
        if fine.use_llm_judge:
            await self._check_judge(fine.judge_model_id)
        elif fine.judge_model_id:
            validate_name(fine.judge_model_id, "fine_tuning_params.judge_model_id")
        pinned = pinned_by_environment(
            self._defaults, searched_dimensions(request.search_space), dataset.classification
        )
        space = space_from_request(request.search_space, dataset.classification, pinned)
        if others:  # the base: a dimension the sampler learns
            space = replace(space, base_model=(base_model, *others))
        validate(space)
        if PROBE_ONLY in space.num_epochs and not dataset.classification:
            raise InvalidArgument(
                "0 epochs (the linear probe alone) exists for classification only",
                field="search_space.num_epochs",
            )
        sampler(request.sampler, 0)
        pruner(request.pruner)
        return StudySpec(
            project_id=request.project_id,
            fine_tuning=FineTuning(
                use_llm_judge=fine.use_llm_judge,
                judge_model_id=fine.judge_model_id,
                base_model_name=base_model,
                n_trials=n_trials,
                time_budget_seconds=fine.time_budget_seconds,
                base_model_names=tuple(others),
            ),
            dataset=dataset,
            space=space,
            training=request.training,
            max_parallel_trials=request.max_parallel_trials,
            sampler=request.sampler,
            pruner=request.pruner,
            max_eval_samples=request.max_eval_samples,
            judge_sample_size=request.judge_sample_size,
            pinned=pinned,
            # Held for every trial, whatever this process's environment is after a restart.
            training_defaults={
                "gradient_accumulation": self._defaults.gradient_accumulation,
                "max_seq_length": self._defaults.max_seq_length,
                "min_samples_per_class": self._defaults.min_samples_per_class,
            },
        )

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
            available = ", ".join(m.id for m in models if m.available) or "none available"
            raise FailedPrecondition(
                f"judge model '{chosen.id}' has no credentials at the judge gateway (set its "
                f"provider's key there, or choose one of: {available})",
                field=field,
            )


# More base models a study may search beside its first.
MAX_EXTRA_BASES = 7


def _check_base(base_model: str, field: str) -> None:
    """A hub name or an existing folder, bounded, without control characters."""
    if (
        not base_model
        or len(base_model) > MAX_PATH_LENGTH
        or escape_control(base_model) != base_model
    ):
        raise InvalidArgument(
            f"must be a hub name or a path of at most {MAX_PATH_LENGTH} characters without "
            f"control characters, got '{excerpt(base_model)}'",
            field=field,
        )
    looks_local = base_model.startswith((".", "/", "~")) or Path(base_model).exists()
    if looks_local and not Path(base_model).expanduser().exists():
        raise InvalidArgument(f"local folder '{excerpt(base_model)}' does not exist", field=field)


def hyperparameters(spec: StudySpec, params: TrialParameters, defaults: Any) -> Hyperparameters:
    """A trial's hyperparameters: the sampled ones, the request's fixed training settings,
    and the environment's defaults as stored with the study (`spec.training_defaults`)."""
    fixed = spec.training

    def default(name: str) -> Any:
        return spec.training_defaults.get(name, getattr(defaults, name))

    return Hyperparameters(
        rank=params.rank,
        alpha=params.alpha,
        dropout=params.dropout,
        target_modules=tuple(params.target_modules),
        use_rslora=params.use_rslora,
        learning_rate=params.learning_rate,
        num_epochs=params.num_epochs,
        batch_size=params.batch_size,
        gradient_accumulation=fixed.gradient_accumulation or int(default("gradient_accumulation")),
        max_seq_length=fixed.max_seq_length or int(default("max_seq_length")),
        warmup_ratio=fixed.warmup_ratio,
        weight_decay=fixed.weight_decay,
        quantize_4bit=fixed.quantize_4bit,
        seed=fixed.seed or spec.dataset.seed,
        focal_gamma=params.focal_gamma,
        use_class_weights=params.use_class_weights,
        use_weighted_sampler=params.use_weighted_sampler,
        min_samples_per_class=int(default("min_samples_per_class")),
        probe_only=params.num_epochs == 0,
        posthoc_logit_adjustment=params.posthoc_logit_adjustment,
        logit_adjust_tau=params.logit_adjust_tau,
        sampler_power=params.sampler_power,
        two_stage=params.two_stage,
        group_separator=params.group_separator,
    )
