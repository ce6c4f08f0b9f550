"""What the optimizer stores: typed, versioned study and trial records, independent of the protos.

A study's record lives in its Optuna user attribute `loratune` as plain JSON with a
`schema` number; trial facts live in the trial's user attributes under fixed keys. The
field names are this module's, not a message's: renaming a proto field changes
`api/convert.py`, never what is stored. Records written before the schema had a number
(schema 1: protobuf's JSON of the CreateStudyRequest, camelCase) are read and upgraded
by `StudyRecord.from_storage`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from services.optimizer.core.space import FloatRange, SearchSpace, default_space, pin

SCHEMA_VERSION = 2
META = "loratune"  # the study's user attribute holding its record
ACTIVE = ("QUEUED", "RUNNING")
STATES = ("QUEUED", "RUNNING", "COMPLETED", "CANCELLED", "FAILED")
CLASSIFICATION = "classification"
GENERATION = "generation"


@dataclass(frozen=True)
class FineTuning:
    """The seed's parameters, with defaults filled in."""

    use_llm_judge: bool = False
    judge_model_id: str = ""
    base_model_name: str = ""
    n_trials: int = 0
    time_budget_seconds: int = 0  # 0: none; else no trial starts once this much has passed
    # Further bases searched beside base_model_name (a request's, checked: every base).
    base_model_names: tuple[str, ...] = ()

    @property
    def bases(self) -> tuple[str, ...]:
        """Every base model the study searches, base_model_name first."""
        return (self.base_model_name, *self.base_model_names)


@dataclass(frozen=True)
class DatasetRef:
    """Where a study's data is and how to read it (the trainer reads it)."""

    uri: str = ""
    task: str = CLASSIFICATION  # CLASSIFICATION or GENERATION
    format: str = ""
    text_field: str = ""
    label_field: str = ""
    prompt_field: str = ""
    target_field: str = ""
    validation_uri: str = ""
    validation_fraction: float = 0.0
    seed: int = 0

    @property
    def classification(self) -> bool:
        """Whether the task is classification."""
        return self.task == CLASSIFICATION


@dataclass(frozen=True)
class TrainingOverrides:
    """Training settings a request fixes for every trial (0 / False = the default)."""

    gradient_accumulation: int = 0
    max_seq_length: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    quantize_4bit: bool = False
    seed: int = 0


@dataclass(frozen=True)
class StudySpec:
    """Everything a study was asked to do, as it runs (the effective search space)."""

    project_id: int
    fine_tuning: FineTuning
    dataset: DatasetRef
    space: SearchSpace
    training: TrainingOverrides = TrainingOverrides()
    max_parallel_trials: int = 0
    sampler: str = ""
    pruner: str = ""
    max_eval_samples: int = 0
    judge_sample_size: int = 0
    # Dimensions fixed by variables the user set (`space.pinned_by_environment`).
    pinned: Mapping[str, Any] = field(default_factory=dict)
    # GRADIENT_ACCUMULATION, MAX_SEQ_LENGTH, MIN_SAMPLES_PER_CLASS when it was created.
    training_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def objective_name(self) -> str:
        """f1_macro for classification, combined for generation."""
        return "f1_macro" if self.dataset.classification else "combined"


@dataclass
class StudyRecord:
    """A study's stored state: its spec and where it is."""

    spec: StudySpec
    fingerprint: str = ""
    state: str = "QUEUED"
    create_time: str = ""
    start_time: str = ""
    end_time: str = ""
    failure_reason: str = ""
    best_model_dir: str = ""
    failures: int = 0
    last_failure: str = ""
    fatal: str = ""  # set by a trial: the study must stop with this reason
    # Why a study stopped starting trials before n_trials ran (its time budget was spent,
    # or its sampler proposed only points already run); empty when it ran them all.
    end_note: str = ""
    # The completed study's report (core/report.py SelectionReport.to_json()); None before.
    report: dict[str, Any] | None = None
    oom_configs: list[str] = field(default_factory=list)
    excluded_classes: list[dict[str, Any]] | None = None

    def to_storage(self) -> dict[str, Any]:
        """The JSON-ready record, with its schema number."""
        spec = self.spec
        content = asdict(self)
        content["spec"] = {
            "project_id": spec.project_id,
            "fine_tuning": asdict(spec.fine_tuning),
            "dataset": asdict(spec.dataset),
            "space": space_to_dict(spec.space),
            "training": asdict(spec.training),
            "max_parallel_trials": spec.max_parallel_trials,
            "sampler": spec.sampler,
            "pruner": spec.pruner,
            "max_eval_samples": spec.max_eval_samples,
            "judge_sample_size": spec.judge_sample_size,
            "pinned": dict(spec.pinned),
            "training_defaults": dict(spec.training_defaults),
        }
        return {"schema": SCHEMA_VERSION, **content}

    @classmethod
    def from_storage(cls, stored: Mapping[str, Any]) -> StudyRecord:
        """Reads a stored record, upgrading one of an older schema."""
        schema = int(stored.get("schema", 1))
        if schema == 1:
            return _from_schema_1(stored)
        if schema != SCHEMA_VERSION:
            raise ValueError(f"study record schema {schema} is newer than this optimizer's")
        spec = stored["spec"]
        values = {f.name: stored[f.name] for f in fields(cls) if f.name in stored}
        values["spec"] = StudySpec(
            project_id=int(spec["project_id"]),
            fine_tuning=_build(FineTuning, spec["fine_tuning"]),
            dataset=_build(DatasetRef, spec["dataset"]),
            space=space_from_dict(spec["space"]),
            training=_build(TrainingOverrides, spec.get("training", {})),
            max_parallel_trials=int(spec.get("max_parallel_trials", 0)),
            sampler=str(spec.get("sampler", "")),
            pruner=str(spec.get("pruner", "")),
            max_eval_samples=int(spec.get("max_eval_samples", 0)),
            judge_sample_size=int(spec.get("judge_sample_size", 0)),
            pinned=dict(spec.get("pinned", {})),
            training_defaults=dict(spec.get("training_defaults", {})),
        )
        return cls(**values)


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    """A search space as plain JSON."""
    content = asdict(space)
    content["module_sets"] = {k: list(v) for k, v in space.module_sets.items()}
    return content


def space_from_dict(content: Mapping[str, Any]) -> SearchSpace:
    """The inverse of `space_to_dict`."""

    def rng(value: Mapping[str, Any]) -> FloatRange:
        return FloatRange(float(value["low"]), float(value["high"]), bool(value.get("log")))

    return SearchSpace(
        rank=tuple(int(v) for v in content["rank"]),
        alpha_multiplier=tuple(float(v) for v in content["alpha_multiplier"]),
        dropout=rng(content["dropout"]),
        learning_rate=rng(content["learning_rate"]),
        num_epochs=tuple(int(v) for v in content["num_epochs"]),
        target_modules=tuple(str(v) for v in content["target_modules"]),
        use_rslora=tuple(bool(v) for v in content["use_rslora"]),
        batch_size=tuple(int(v) for v in content.get("batch_size", ())),
        focal_gamma=rng(content["focal_gamma"]),
        use_class_weights=tuple(bool(v) for v in content["use_class_weights"]),
        use_weighted_sampler=tuple(bool(v) for v in content["use_weighted_sampler"]),
        posthoc_logit_adjustment=tuple(
            bool(v) for v in content.get("posthoc_logit_adjustment", (False,))
        ),
        logit_adjust_tau=rng(content.get("logit_adjust_tau", {"low": 0.0, "high": 0.0})),
        sampler_power=rng(content.get("sampler_power", {"low": 0.0, "high": 0.0})),
        two_stage=tuple(bool(v) for v in content.get("two_stage", (False,))),
        group_separator=tuple(str(v) for v in content.get("group_separator", ("",))),
        module_sets={k: tuple(v) for k, v in content.get("module_sets", {}).items()},
        base_model=tuple(str(v) for v in content.get("base_model", ())),
    )


def space_from_request(
    requested: Mapping[str, Any], classification: bool, pinned: Mapping[str, Any]
) -> SearchSpace:
    """The effective space: a request's search space (snake_case fields of the contract's
    SearchSpace, absent = the default) over the task's defaults, with `pinned` held fixed."""
    space = default_space(classification)

    def rng(name: str, current: FloatRange) -> FloatRange:
        value = requested.get(name) or {}
        low, high = float(value.get("low", 0.0)), float(value.get("high", 0.0))
        if not low and not high:
            return current
        return FloatRange(low, high, bool(value.get("log", False)))

    def values(name: str, kind: type, current: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(kind(v) for v in requested.get(name, ())) or current

    choices = list(requested.get("target_modules", ()))
    space = SearchSpace(
        rank=values("rank", int, space.rank),
        alpha_multiplier=values("alpha_multiplier", float, space.alpha_multiplier),
        dropout=rng("dropout", space.dropout),
        learning_rate=rng("learning_rate", space.learning_rate),
        num_epochs=values("num_epochs", int, space.num_epochs),
        target_modules=tuple(str(c["name"]) for c in choices) or space.target_modules,
        use_rslora=values("use_rslora", bool, space.use_rslora),
        batch_size=values("batch_size", int, ()),
        focal_gamma=rng("focal_gamma", space.focal_gamma),
        use_class_weights=values("use_class_weights", bool, space.use_class_weights),
        use_weighted_sampler=values("use_weighted_sampler", bool, space.use_weighted_sampler),
        posthoc_logit_adjustment=values(
            "posthoc_logit_adjustment", bool, space.posthoc_logit_adjustment
        ),
        logit_adjust_tau=rng("logit_adjust_tau", space.logit_adjust_tau),
        sampler_power=rng("sampler_power", space.sampler_power),
        two_stage=values("two_stage", bool, space.two_stage),
        group_separator=values("group_separator", str, space.group_separator),
        module_sets={
            str(c["name"]): tuple(str(m) for m in c["modules"]) for c in choices if c.get("modules")
        },
    )
    return pin(space, pinned)


def searched_dimensions(requested: Mapping[str, Any]) -> set[str]:
    """The dimensions a request's search space sets (so searches, or fixes itself)."""
    searched = {
        name
        for name in ("num_epochs", "batch_size", "use_class_weights", "use_weighted_sampler")
        if requested.get(name)
    }
    for name in ("learning_rate", "focal_gamma"):
        value = requested.get(name) or {}
        if value.get("low") or value.get("high"):
            searched.add(name)
    return searched


# ---- schema 1: protobuf's JSON of the request, in camelCase ---------------------------------

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def snake_keys(value: Any) -> Any:
    """`value` with every dict key turned from camelCase (protobuf's JSON) to snake_case."""
    if isinstance(value, Mapping):
        return {_CAMEL.sub("_", str(k)).lower(): snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    return value


def _task(value: Any) -> str:
    text = str(value or "").upper()
    return GENERATION if text.endswith("GENERATION") or text == "2" else CLASSIFICATION


def dataset_from_request(dataset: Mapping[str, Any]) -> DatasetRef:
    """A DatasetRef from the contract's DatasetSpec fields (snake_case, enum by name)."""
    values = {f.name: dataset[f.name] for f in fields(DatasetRef) if f.name in dataset}
    values["task"] = _task(dataset.get("task_type"))
    built: DatasetRef = _build(DatasetRef, values)
    return built


def _from_schema_1(stored: Mapping[str, Any]) -> StudyRecord:
    """Upgrades a record of the first schema (the request stored as protobuf's JSON)."""
    request = snake_keys(stored.get("request", {}))
    dataset = dataset_from_request(request.get("dataset", {}))
    fine = snake_keys(stored.get("fine_tuning_params", {}))
    spec = StudySpec(
        project_id=int(stored.get("project_id", request.get("project_id", 0)) or 0),
        fine_tuning=_build(FineTuning, fine),
        dataset=dataset,
        space=space_from_request(request.get("search_space", {}), dataset.classification, {}),
        training=_build(TrainingOverrides, request.get("training", {})),
        max_parallel_trials=int(request.get("max_parallel_trials", 0)),
        sampler=str(request.get("sampler", "")),
        pruner=str(request.get("pruner", "")),
        max_eval_samples=int(request.get("max_eval_samples", 0)),
        judge_sample_size=int(request.get("judge_sample_size", 0)),
    )
    return StudyRecord(
        spec=spec,
        fingerprint=str(stored.get("fingerprint", "")),
        state=str(stored.get("state", "QUEUED")),
        create_time=str(stored.get("create_time", "")),
        start_time=str(stored.get("start_time", "")),
        end_time=str(stored.get("end_time", "")),
        failure_reason=str(stored.get("failure_reason", "")),
        best_model_dir=str(stored.get("best_model_dir", "")),
        failures=int(stored.get("failures", 0)),
        last_failure=str(stored.get("last_failure", "")),
        fatal=str(stored.get("fatal", "")),
        oom_configs=list(stored.get("oom_configs", [])),
    )


def _build(kind: type[Any], values: Mapping[str, Any]) -> Any:
    """`kind(**values)` for the keys it knows, each converted to its field's default's type."""
    defaults = kind()
    known = {}
    for f in fields(kind):
        if f.name in values and values[f.name] is not None:
            known[f.name] = type(getattr(defaults, f.name))(values[f.name])
    return replace(defaults, **known)


@dataclass(frozen=True)
class Hyperparameters:
    """One trial's hyperparameters as sent to the trainer (the contract's three groups)."""

    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False
    learning_rate: float = 0.0
    num_epochs: int = 0
    batch_size: int = 0
    gradient_accumulation: int = 0
    max_seq_length: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    quantize_4bit: bool = False
    seed: int = 0
    focal_gamma: float = 0.0
    use_class_weights: bool = False
    use_weighted_sampler: bool = False
    min_samples_per_class: int = 0
    probe_only: bool = False  # classification: the linear probe alone (num_epochs 0)
    posthoc_logit_adjustment: bool = False
    logit_adjust_tau: float = 0.0
    sampler_power: float = 0.0
    two_stage: bool = False
    group_separator: str = ""

    def to_storage(self) -> dict[str, Any]:
        """Grouped as the contract groups them (lora / training / balancing), snake_case."""
        groups: dict[str, dict[str, Any]] = {"lora": {}, "training": {}, "balancing": {}}
        for name, group in _HYPER_GROUPS.items():
            value = getattr(self, name)
            groups[group][name] = list(value) if isinstance(value, tuple) else value
        return groups

    @classmethod
    def from_storage(cls, stored: Mapping[str, Any]) -> Hyperparameters:
        """Reads either schema (this one, or protobuf's camelCase JSON of schema 1); a field
        a record lacks takes its default."""
        plain = snake_keys(stored)
        flat = {name: plain.get(group, {}).get(name) for name, group in _HYPER_GROUPS.items()}
        if flat.get("target_modules") is not None:
            flat["target_modules"] = tuple(str(m) for m in flat["target_modules"])
        built: Hyperparameters = _build(cls, flat)
        return built


_HYPER_GROUPS = {
    "rank": "lora",
    "alpha": "lora",
    "dropout": "lora",
    "target_modules": "lora",
    "use_rslora": "lora",
    "learning_rate": "training",
    "num_epochs": "training",
    "batch_size": "training",
    "gradient_accumulation": "training",
    "max_seq_length": "training",
    "warmup_ratio": "training",
    "weight_decay": "training",
    "quantize_4bit": "training",
    "seed": "training",
    "focal_gamma": "balancing",
    "use_class_weights": "balancing",
    "use_weighted_sampler": "balancing",
    "min_samples_per_class": "balancing",
    "probe_only": "training",
    "posthoc_logit_adjustment": "balancing",
    "logit_adjust_tau": "balancing",
    "sampler_power": "balancing",
    "two_stage": "balancing",
    "group_separator": "balancing",
}


@dataclass(frozen=True)
class StudyRequest:
    """A CreateStudy request in domain terms (the API converts the message to it)."""

    project_id: int
    study_name: str
    fine_tuning: FineTuning
    # None: the project's (`projects.with_project`).
    dataset: DatasetRef | None
    search_space: Mapping[str, Any] = field(default_factory=dict)  # the contract's fields
    training: TrainingOverrides = TrainingOverrides()
    max_parallel_trials: int = 0
    sampler: str = ""
    pruner: str = ""
    max_eval_samples: int = 0
    judge_sample_size: int = 0
    # Whether the request carried fine_tuning_params (else a project's judge default holds).
    fine_tuning_given: bool = True
