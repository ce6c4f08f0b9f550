"""Reading the projects file (LORATUNE_PROJECTS): YAML -> validated `Project`s, or the first error.

The shape (the dataset's keys are the contract's `DatasetSpec` fields; everything after
`dataset` is an optional default of the project's studies):

    projects:
      - id: 123                       # > 0, unique
        name: payments                # letters, digits, '.', '_', '-'; unique
        dataset:
          uri: data/payments.csv      # relative = relative to this file's folder
          task_type: classification   # or generation (TASK_TYPE_* names work too)
          format: csv                 # csv | jsonl | json; empty = by extension
          text_field: text            # label_field, prompt_field, target_field alike
          validation_uri: ""          # relative as uri
          validation_fraction: 0.1
          seed: 42
        base_model_name: Qwen/Qwen3-0.6B
        base_model_names: [models/all-mpnet-base-v2]   # more bases searched (a list; optional)
        use_llm_judge: false          # generation only
        judge_model_id: gemini
        n_trials: 20                  # 5..100
        time_budget: 90m              # no trial starts after 90 minutes (s, m, h, d; 0 = none)
        search_space: {rank: [8, 16], learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}}
        training: {max_seq_length: 256}

`search_space` is the protobuf JSON of `SearchSpace` (snake_case or camelCase keys), read
by the parser the composition root passes in (the core knows no protobuf); `training`
takes the `TrainingParams` fields a CreateStudy request fixes. A relative `uri` is joined
to the folder of the path the file was named by, symbolic links not followed: a
Kubernetes ConfigMap's file is a link into a hidden `..data` folder, and the data beside
it is meant, not beside the link's target. Whether the data files exist is checked when a
study is created (they may appear later than the file). Every error names the entry and
the field, e.g. `projects[1].dataset.task_type: ... (project 124)`, with values shown only
as short, escaped excerpts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.durations import parse_duration
from services.common.errors import InvalidArgument
from services.common.names import MAX_PATH_LENGTH, escape_control, excerpt, validate_name
from services.optimizer.core.records import (
    CLASSIFICATION,
    GENERATION,
    DatasetRef,
    TrainingOverrides,
    space_from_request,
)
from services.optimizer.core.space import PROBE_ONLY, validate

__all__ = [
    "MAX_FILE_BYTES",
    "Project",
    "SearchSpaceParser",
    "parse_projects",
    "read_projects",
]

MAX_FILE_BYTES = 1 << 20
MAX_ID = 2**63 - 1
MAX_FIELD_NAME = 256

SearchSpaceParser = Callable[[Mapping[str, Any]], Mapping[str, Any]]
"""The contract's SearchSpace JSON (either key style) -> its snake_case dict, or
InvalidArgument naming the bad key below `search_space`."""


@dataclass(frozen=True)
class Project:
    """A team's project: its data and the defaults of its studies."""

    project_id: int
    name: str
    dataset: DatasetRef
    base_model_name: str = ""
    use_llm_judge: bool = False
    judge_model_id: str = ""
    n_trials: int = 0
    time_budget_seconds: int = 0  # 0: none
    base_model_names: tuple[str, ...] = ()  # further bases searched beside base_model_name
    # The contract's SearchSpace fields (snake_case), as a request's search space.
    search_space: Mapping[str, Any] = field(default_factory=dict)
    training: TrainingOverrides = field(default_factory=TrainingOverrides)


_PROJECT_KEYS = (
    "id",
    "name",
    "dataset",
    "base_model_name",
    "base_model_names",
    "use_llm_judge",
    "judge_model_id",
    "n_trials",
    "time_budget",
    "search_space",
    "training",
)
_DATASET_KEYS = (
    "uri",
    "format",
    "task_type",
    "text_field",
    "label_field",
    "prompt_field",
    "target_field",
    "validation_uri",
    "validation_fraction",
    "seed",
)
_FIELD_KEYS = ("text_field", "label_field", "prompt_field", "target_field")
_TRAINING_KEYS = (
    "gradient_accumulation",
    "max_seq_length",
    "warmup_ratio",
    "weight_decay",
    "quantize_4bit",
    "seed",
)
_FORMATS = ("csv", "jsonl", "json")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


# ---- YAML: safe_load, with a repeated key an error and 1e-4 a number -------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a config file's author would be surprised."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        if not isinstance(key, str | int | float | bool):
            continue  # construct_mapping refuses what cannot be a key
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{excerpt(str(key))}' is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_repeats,  # type: ignore[arg-type]
)
# YAML 1.1 (PyYAML) reads 1e-4 as a string; YAML 1.2 and JSON read it as a number.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# ---- reading --------------------------------------------------------------------------------


def read_projects(path: Path, search_space: SearchSpaceParser) -> tuple[Project, ...]:
    """The projects of the file at `path`; InvalidArgument naming the first problem."""
    try:
        with path.open("rb") as f:
            content = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise InvalidArgument(f"cannot be read ({err.strerror or type(err).__name__})") from None
    if len(content) > MAX_FILE_BYTES:
        raise InvalidArgument(f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"is not UTF-8 text (byte {err.start})") from None
    folder = Path(os.path.abspath(path)).parent
    return parse_projects(text, folder, search_space)


def parse_projects(text: str, folder: Path, search_space: SearchSpaceParser) -> tuple[Project, ...]:
    """The projects of a file's `text`, relative paths joined to `folder`; sorted by id."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidArgument(
            f"is not valid YAML{where}: {excerpt(err.problem or 'unreadable', 200)}"
        ) from None
    except yaml.YAMLError as err:
        raise InvalidArgument(f"is not valid YAML: {excerpt(str(err), 200)}") from None
    if not isinstance(document, dict) or not isinstance(document.get("projects"), list):
        raise InvalidArgument(
            "must be a mapping with a 'projects' list (`projects: []` for none)", field="projects"
        )
    for key in document:
        if key != "projects":
            raise InvalidArgument("unknown top-level key (only 'projects')", field=_key(key))
    projects: list[Project] = []
    ids: dict[int, int] = {}
    names: dict[str, int] = {}
    for index, entry in enumerate(document["projects"]):
        project = _entry(index, entry, folder, search_space)
        where = f"projects[{index}]"
        if project.project_id in ids:
            raise InvalidArgument(
                f"{project.project_id} is also the id of projects[{ids[project.project_id]}]",
                field=f"{where}.id",
            )
        if project.name in names:
            raise InvalidArgument(
                f"'{project.name}' is also the name of projects[{names[project.name]}]",
                field=f"{where}.name",
            )
        ids[project.project_id] = index
        names[project.name] = index
        projects.append(project)
    return tuple(sorted(projects, key=lambda p: p.project_id))


# ---- one entry --------------------------------------------------------------------------------


def _key(key: Any) -> str:
    return excerpt(str(key), 40)


def _entry(index: int, entry: Any, folder: Path, search_space: SearchSpaceParser) -> Project:
    where = f"projects[{index}]"
    if not isinstance(entry, dict):
        raise InvalidArgument(
            f"must be a mapping with id, name and dataset, got {_kind(entry)}", field=where
        )
    project_id = entry.get("id")
    try:
        return _project(entry, folder, search_space)
    except InvalidArgument as err:
        # The entry's id, when it is one, helps find it in a long file.
        known = (
            f" (project {project_id})"
            if isinstance(project_id, int) and not isinstance(project_id, bool)
            else ""
        )
        raise InvalidArgument(
            f"{err.message}{known}", field=f"{where}.{err.field}" if err.field else where
        ) from None


def _project(entry: dict[Any, Any], folder: Path, search_space: SearchSpaceParser) -> Project:
    _known_keys(entry, _PROJECT_KEYS, "")
    for required in ("id", "name", "dataset"):
        if entry.get(required) is None:
            raise InvalidArgument("is required", field=required)
    project_id = _integer(entry["id"], "id", 1, MAX_ID)
    name = _display_name(_string(entry["name"], "name"))
    dataset = _dataset(entry["dataset"], folder)
    base_model = _string(entry.get("base_model_name", ""), "base_model_name")
    if len(base_model) > MAX_PATH_LENGTH:
        raise InvalidArgument(
            f"must be at most {MAX_PATH_LENGTH} characters", field="base_model_name"
        )
    others = entry.get("base_model_names", [])
    if not isinstance(others, list) or len(others) > 7:
        raise InvalidArgument(
            f"must be a list of at most 7 base models, got {_kind(others)}",
            field="base_model_names",
        )
    names = []
    for i, value in enumerate(others):
        other = _string(value, f"base_model_names[{i}]")
        if not other or len(other) > MAX_PATH_LENGTH:
            raise InvalidArgument(
                f"must be a hub name or a path of 1 to {MAX_PATH_LENGTH} characters",
                field=f"base_model_names[{i}]",
            )
        names.append(other)
    if names and not base_model:
        raise InvalidArgument(
            "needs base_model_name: the first base, the others searched beside it",
            field="base_model_names",
        )
    use_judge = _boolean(entry.get("use_llm_judge", False), "use_llm_judge")
    if use_judge and dataset.classification:
        raise InvalidArgument(
            "the LLM judge scores generated texts; a classification project's studies are "
            "scored by macro-F1, so leave it off",
            field="use_llm_judge",
        )
    judge_id = _string(entry.get("judge_model_id", ""), "judge_model_id")
    if judge_id:
        validate_name(judge_id, "judge_model_id")
    n_trials = _integer(entry.get("n_trials", 0), "n_trials", 0, MAX_ID)
    if n_trials and not 5 <= n_trials <= 100:
        raise InvalidArgument(
            f"must be between 5 and 100, or 0 for LORA_N_TRIALS (got {n_trials})",
            field="n_trials",
        )
    try:
        time_budget = parse_duration(entry.get("time_budget", 0))
    except ValueError as err:
        raise InvalidArgument(str(err), field="time_budget") from None
    space = _search_space(entry.get("search_space"), dataset.classification, search_space)
    return Project(
        project_id=project_id,
        name=name,
        dataset=dataset,
        base_model_name=base_model,
        use_llm_judge=use_judge,
        judge_model_id=judge_id,
        n_trials=n_trials,
        time_budget_seconds=time_budget,
        base_model_names=tuple(names),
        search_space=space,
        training=_training(entry.get("training")),
    )


def _dataset(value: Any, folder: Path) -> DatasetRef:
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"must be a mapping of DatasetSpec fields, got {_kind(value)}", field="dataset"
        )
    _known_keys(value, _DATASET_KEYS, "dataset.")
    if not value.get("uri"):
        raise InvalidArgument("is required: the training file", field="dataset.uri")
    if value.get("task_type") is None:
        raise InvalidArgument(
            "is required: classification or generation", field="dataset.task_type"
        )
    task = _string(value["task_type"], "dataset.task_type")
    normal = task.strip().lower().removeprefix("task_type_")
    if normal not in (CLASSIFICATION, GENERATION):
        raise InvalidArgument(
            f"must be classification or generation, got '{excerpt(task)}'",
            field="dataset.task_type",
        )
    data_format = _string(value.get("format", ""), "dataset.format").lower()
    if data_format and data_format not in _FORMATS:
        raise InvalidArgument(
            f"must be one of {', '.join(_FORMATS)} or empty, got '{excerpt(data_format)}'",
            field="dataset.format",
        )
    columns = {}
    for key in _FIELD_KEYS:
        column = _string(value.get(key, ""), f"dataset.{key}")
        if len(column) > MAX_FIELD_NAME:
            raise InvalidArgument(
                f"must be at most {MAX_FIELD_NAME} characters", field=f"dataset.{key}"
            )
        columns[key] = column
    fraction = _number(value.get("validation_fraction", 0.0), "dataset.validation_fraction")
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(
            f"must be at least 0 and below 1 (0 = the default 0.1), got {fraction:g}",
            field="dataset.validation_fraction",
        )
    validation = value.get("validation_uri") or ""
    return DatasetRef(
        uri=_location(value["uri"], folder, "dataset.uri"),
        task=normal,
        format=data_format,
        validation_uri=_location(validation, folder, "dataset.validation_uri")
        if validation
        else "",
        validation_fraction=fraction,
        seed=_integer(value.get("seed", 0), "dataset.seed", -MAX_ID - 1, MAX_ID),
        **columns,
    )


def _location(value: Any, folder: Path, name: str) -> str:
    """A path or URI; a relative path joined to the projects file's folder."""
    text = _string(value, name)
    if len(text) > MAX_PATH_LENGTH:
        raise InvalidArgument(f"must be at most {MAX_PATH_LENGTH} characters", field=name)
    if _SCHEME.match(text) or os.path.isabs(text):
        return text
    return os.path.normpath(os.path.join(folder, text))


def _search_space(value: Any, classification: bool, parse: SearchSpaceParser) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"must be a mapping of SearchSpace fields, got {_kind(value)}", field="search_space"
        )
    parsed = dict(parse(value))
    # The same checks as a request's space (without the environment's pins, which apply
    # when a study is created).
    space = space_from_request(parsed, classification, {})
    validate(space)
    if PROBE_ONLY in space.num_epochs and not classification:
        raise InvalidArgument(
            "0 epochs (the linear probe alone) exists for classification only",
            field="search_space.num_epochs",
        )
    return parsed


def _training(value: Any) -> TrainingOverrides:
    if value is None:
        return TrainingOverrides()
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"must be a mapping of TrainingParams fields, got {_kind(value)}", field="training"
        )
    _known_keys(value, _TRAINING_KEYS, "training.")
    warmup = _number(value.get("warmup_ratio", 0.0), "training.warmup_ratio")
    if not 0.0 <= warmup <= 1.0:
        raise InvalidArgument(
            f"must be between 0 and 1, got {warmup:g}", field="training.warmup_ratio"
        )
    decay = _number(value.get("weight_decay", 0.0), "training.weight_decay")
    if decay < 0:
        raise InvalidArgument(f"must be at least 0, got {decay:g}", field="training.weight_decay")
    return TrainingOverrides(
        gradient_accumulation=_integer(
            value.get("gradient_accumulation", 0), "training.gradient_accumulation", 0, 2**32 - 1
        ),
        max_seq_length=_integer(
            value.get("max_seq_length", 0), "training.max_seq_length", 0, 2**32 - 1
        ),
        warmup_ratio=warmup,
        weight_decay=decay,
        quantize_4bit=_boolean(value.get("quantize_4bit", False), "training.quantize_4bit"),
        seed=_integer(value.get("seed", 0), "training.seed", -MAX_ID - 1, MAX_ID),
    )


# ---- scalars --------------------------------------------------------------------------------


# A project's name is for people: any language, any punctuation, but one bounded line. Where
# something about a project becomes a path, a job id or a metric label, its numeric id does.
MAX_PROJECT_NAME = 100


def _display_name(value: str) -> str:
    name = value.strip()
    if not name:
        raise InvalidArgument("must not be empty", field="name")
    if escape_control(name) != name:
        raise InvalidArgument(
            f"must be one line without control characters, got '{excerpt(name)}'", field="name"
        )
    if len(name) > MAX_PROJECT_NAME:
        raise InvalidArgument(
            f"must be at most {MAX_PROJECT_NAME} characters, got {len(name)}", field="name"
        )
    return name


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} '{excerpt(str(value), 32)}'"


def _known_keys(value: dict[Any, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in value:
        if key not in known:
            raise InvalidArgument(
                f"unknown field (known: {', '.join(known)})", field=f"{prefix}{_key(key)}"
            )


def _string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"must be text, got {_kind(value)}", field=name)
    if escape_control(value) != value:
        raise InvalidArgument(
            f"must not contain control characters, got '{excerpt(value)}'", field=name
        )
    return value


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"must be a whole number, got {_kind(value)}", field=name)
    if not low <= value <= high:
        raise InvalidArgument(f"must be between {low} and {high}, got {value}", field=name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"must be a number, got {_kind(value)}", field=name)
    if not math.isfinite(value):
        raise InvalidArgument("must be a finite number", field=name)
    return float(value)


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"must be true or false, got {_kind(value)}", field=name)
    return value
