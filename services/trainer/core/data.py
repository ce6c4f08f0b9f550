"""Dataset loading (JSONL / CSV, UTF-8), the train / validation split and class statistics."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.trainer.core.balancing import class_weights
from services.trainer.core.types import ClassStats, DatasetSpec, Example, PreparedData, Task

__all__ = [
    "WEIGHT_FORMULA",
    "class_statistics_table",
    "class_weights_json",
    "load_examples",
    "prepare",
    "write_split",
]

logger = logging.getLogger(__name__)

WEIGHT_FORMULA = "n_samples / (n_classes * n_samples_i)"

# "json" covers both a JSON array of objects and JSON Lines: the parser tells them apart.
_FORMATS = {"jsonl": "json", "json": "json", "ndjson": "json", "csv": "csv"}
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
# Spreadsheet exports in many locales (Russian Excel / 1C among them) separate with ";".
_CSV_DELIMITERS = (",", ";", "\t")
# Bumped whenever parsing or splitting changes, so old tokenisation caches stop matching.
_FINGERPRINT_VERSION = 1

_Row = Mapping[str, Any]


# ---- loading ---------------------------------------------------------------------------


def load_examples(
    uri: str, fmt: str, task: Task, spec: DatasetSpec, field_prefix: str = "dataset.uri"
) -> list[Example]:
    """Read one JSONL / JSON / CSV file into examples with the field names ``spec`` gives.

    ``fmt`` is "jsonl", "json" or "csv" (any case), or "" to go by the file's extension.
    Labels, prompts and targets come back as strings (a number label 62 becomes "62");
    labels lose surrounding whitespace. Classification rows with an empty text or label
    and generation rows with an empty prompt or target are dropped, and the count is
    logged. Errors about the file itself name ``field_prefix`` (pass
    "dataset.validation_uri" for a validation file).

    Raises:
        InvalidArgument: the file is missing, unreadable, not UTF-8, malformed (the line
            is named), empty, in an unknown format (``dataset.format``), lacks a named
            field (``dataset.text_field`` etc., listing the fields it has), or every row
            was dropped as empty.
    """
    examples, _raw, _fmt = _load(uri, fmt, task, spec, field_prefix)
    return examples


def _load(
    uri: str, fmt: str, task: Task, spec: DatasetSpec, field_prefix: str
) -> tuple[list[Example], bytes, str]:
    path = _local_path(uri, field_prefix)
    raw = _read_bytes(path, uri, field_prefix)
    kind = _resolve_format(path, fmt)
    text = _decode(raw, uri, field_prefix)
    rows = (
        _csv_rows(text, uri, field_prefix) if kind == "csv" else _json_rows(text, uri, field_prefix)
    )
    examples = _to_examples(rows, task, spec, uri, field_prefix)
    return examples, raw, kind


def _local_path(uri: str, field_prefix: str) -> Path:
    if not uri.strip():
        raise InvalidArgument("is empty: give the path of a JSONL or CSV file", field=field_prefix)
    location = uri.removeprefix("file://")
    if "://" in location:
        raise InvalidArgument(
            f"{uri!r} is not a local file: only local paths and file:// URIs are supported",
            field=field_prefix,
        )
    return Path(location).expanduser()


def _resolve_format(path: Path, fmt: str) -> str:
    if fmt:
        kind = _FORMATS.get(fmt.strip().lower())
        if kind is None:
            raise InvalidArgument(
                f"unknown format {fmt!r}: use jsonl, json or csv (or leave it empty to go by "
                "the file's extension)",
                field="dataset.format",
            )
        return kind
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise InvalidArgument(
            f"cannot tell the format of {path.name!r} from its extension "
            f"({path.suffix or 'none'}): name it .jsonl, .json or .csv, or set dataset.format",
            field="dataset.format",
        )
    return kind


def _read_bytes(path: Path, uri: str, field_prefix: str) -> bytes:
    if not path.exists():
        raise InvalidArgument(f"{uri} does not exist", field=field_prefix)
    if not path.is_file():
        raise InvalidArgument(f"{uri} is not a file", field=field_prefix)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"{uri} cannot be read: {exc.strerror or exc}", field=field_prefix
        ) from exc


def _decode(raw: bytes, uri: str, field_prefix: str) -> str:
    try:
        # utf-8-sig drops the byte-order mark Excel and Notepad put in front of UTF-8 files.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidArgument(
            f"{uri} line {line} is not valid UTF-8 (byte {exc.start}); save the file as UTF-8",
            field=field_prefix,
        ) from exc


def _json_rows(text: str, uri: str, field_prefix: str) -> Iterator[tuple[str, _Row]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"{uri} line {exc.lineno} is not valid JSON: {exc.msg}", field=field_prefix
            ) from exc
        for number, item in enumerate(items, start=1):
            yield _json_object(item, f"{uri} item {number}", field_prefix)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"{uri} line {number} is not valid JSON: {exc.msg} (column {exc.colno})",
                field=field_prefix,
            ) from exc
        yield _json_object(item, f"{uri} line {number}", field_prefix)


def _json_object(item: Any, where: str, field_prefix: str) -> tuple[str, _Row]:
    if not isinstance(item, dict):
        raise InvalidArgument(
            f"{where} is a JSON {type(item).__name__}, not an object", field=field_prefix
        )
    return where, item


def _csv_rows(text: str, uri: str, field_prefix: str) -> Iterator[tuple[str, _Row]]:
    header_line = text.split("\n", 1)[0]
    delimiter = max(_CSV_DELIMITERS, key=header_line.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for row in reader:
            where = f"{uri} line {reader.line_num}"
            if None in row.values():
                raise InvalidArgument(
                    f"{where} has fewer columns than the header ({len(reader.fieldnames or [])})",
                    field=field_prefix,
                )
            yield where, row
    except csv.Error as exc:
        raise InvalidArgument(
            f"{uri} line {reader.line_num} is not valid CSV: {exc}", field=field_prefix
        ) from exc


def _required_fields(task: Task, spec: DatasetSpec) -> tuple[tuple[str, str], tuple[str, str]]:
    if task is Task.CLASSIFICATION:
        return (spec.text_field, "dataset.text_field"), (spec.label_field, "dataset.label_field")
    return (spec.prompt_field, "dataset.prompt_field"), (spec.target_field, "dataset.target_field")


def _to_examples(
    rows: Iterator[tuple[str, _Row]], task: Task, spec: DatasetSpec, uri: str, field_prefix: str
) -> list[Example]:
    first, second = _required_fields(task, spec)
    for name, spec_field in (first, second):
        if not name:
            raise InvalidArgument("is empty: name the field to read", field=spec_field)
    examples: list[Example] = []
    total = 0
    for where, row in rows:
        total += 1
        values = []
        for name, spec_field in (first, second):
            if name not in row:
                fields = ", ".join(repr(str(key)) for key in row if key is not None) or "none"
                raise InvalidArgument(
                    f"{where} has no field {name!r}; the fields it has: {fields}",
                    field=spec_field,
                )
            values.append(_as_text(row[name], where, name, spec_field))
        a, b = values
        if task is Task.CLASSIFICATION:
            b = b.strip()
            if a.strip() and b:
                examples.append(Example(text=a, label=b))
        elif a.strip() and b.strip():
            examples.append(Example(prompt=a, target=b))
    if total == 0:
        raise InvalidArgument(f"{uri} holds no rows", field=field_prefix)
    dropped = total - len(examples)
    if dropped:
        logger.warning(
            "dropped %d of %d rows of %s with an empty %r or %r",
            dropped,
            total,
            uri,
            first[0],
            second[0],
        )
    if not examples:
        raise InvalidArgument(
            f"all {total} rows of {uri} have an empty {first[0]!r} or {second[0]!r}",
            field=field_prefix,
        )
    return examples


def _as_text(value: Any, where: str, name: str, spec_field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        # json.dumps spells numbers as the file did: 62 -> "62", 62.5 -> "62.5".
        return json.dumps(value)
    raise InvalidArgument(
        f"{where}: field {name!r} holds a JSON {type(value).__name__}; expected text or a number",
        field=spec_field,
    )


# ---- the split -------------------------------------------------------------------------


def prepare(spec: DatasetSpec, min_samples_per_class: int) -> PreparedData:
    """Load, split and filter a dataset for training.

    Validation comes from ``spec.validation_uri`` when given, else from a split of
    ``spec.validation_fraction`` of the rows with ``spec.seed``: stratified by label for
    classification (largest-remainder allocation, so every class gets its share rounded
    fairly; a class with two or more rows keeps at least one in training, a class of one
    row stays in training), random for generation. Classes with fewer than
    ``min_samples_per_class`` training rows leave training and are listed in
    ``stats.excluded``; validation rows of labels not trained on (those, and labels with
    no training row) stay in validation, counted in ``stats.untrained_validation``: the
    model cannot predict them, so each is a miss in the evaluation.

    Raises:
        InvalidArgument: everything ``load_examples`` raises; ``dataset.validation_fraction``
            outside (0, 1) or leaving no validation rows; ``balancing.min_samples_per_class``
            negative or leaving fewer than two classes; ``dataset.label_field`` when the
            data holds a single label; ``dataset.validation_uri`` when no validation row
            has a trained label.
    """
    if min_samples_per_class < 0:
        raise InvalidArgument(
            f"must be >= 0, got {min_samples_per_class}", field="balancing.min_samples_per_class"
        )
    split = not spec.validation_uri
    fraction = spec.validation_fraction
    if split and not 0.0 < fraction < 1.0:
        raise InvalidArgument(
            f"must lie strictly between 0 and 1, got {fraction}",
            field="dataset.validation_fraction",
        )
    train, train_raw, train_kind = _load(spec.uri, spec.format, spec.task, spec, "dataset.uri")
    files = [(train_kind, train_raw)]
    if split:
        if spec.task is Task.CLASSIFICATION:
            train, validation = _stratified_split(train, fraction, spec.seed)
        else:
            train, validation = _random_split(train, fraction, spec.seed)
    else:
        validation, val_raw, val_kind = _load(
            spec.validation_uri, spec.format, spec.task, spec, "dataset.validation_uri"
        )
        files.append((val_kind, val_raw))
    fingerprint = _fingerprint(spec, min_samples_per_class, files)
    if spec.task is not Task.CLASSIFICATION:
        return PreparedData(
            task=spec.task,
            train=tuple(train),
            validation=tuple(validation),
            labels=(),
            stats=None,
            fingerprint=fingerprint,
        )
    return _filter_classes(spec, min_samples_per_class, train, validation, fingerprint)


def _filter_classes(
    spec: DatasetSpec,
    min_samples_per_class: int,
    train: list[Example],
    validation: list[Example],
    fingerprint: str,
) -> PreparedData:
    counts = Counter(example.label for example in train)
    if len(counts) < 2:
        raise InvalidArgument(
            f"the training data holds {len(counts)} label(s) ({', '.join(map(repr, counts))}); "
            "classification needs at least two",
            field="dataset.label_field",
        )
    excluded = {label: n for label, n in counts.items() if n < min_samples_per_class}
    labels = tuple(sorted(label for label in counts if label not in excluded))
    if len(labels) < 2:
        raise InvalidArgument(
            f"{len(labels)} of {len(counts)} classes have at least {min_samples_per_class} "
            "training rows; classification needs at least two: lower min_samples_per_class",
            field="balancing.min_samples_per_class",
        )
    kept = set(labels)
    train = [example for example in train if example.label in kept]
    # Validation rows of labels not trained on stay: the model cannot predict them, so each
    # counts as a miss, and macro-F1 is not flattered by leaving the rare codes out.
    untrained = Counter(example.label for example in validation if example.label not in kept)
    if excluded:
        logger.info(
            "left out %d classes under %d training rows: %s",
            len(excluded),
            min_samples_per_class,
            dict(sorted(excluded.items(), key=lambda item: (-item[1], item[0]))),
        )
    if untrained:
        logger.info(
            "%d validation rows have a label not trained on (%d labels): they count as misses",
            sum(untrained.values()),
            len(untrained),
        )
    if sum(untrained.values()) == len(validation):
        field = "dataset.validation_uri" if spec.validation_uri else "dataset.validation_fraction"
        raise InvalidArgument(
            f"no validation row has one of the {len(labels)} trained labels "
            f"({len(validation)} rows)",
            field=field,
        )
    kept_counts = {label: counts[label] for label in labels}
    weights = class_weights(kept_counts, labels)
    stats = ClassStats(
        counts=kept_counts,
        excluded=dict(sorted(excluded.items())),
        weights=dict(zip(labels, weights, strict=True)),
        untrained_validation=dict(sorted(untrained.items())),
    )
    return PreparedData(
        task=spec.task,
        train=tuple(train),
        validation=tuple(validation),
        labels=labels,
        stats=stats,
        fingerprint=fingerprint,
    )


def _stratified_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    labels = sorted(by_label)
    capacity = {label: len(by_label[label]) - 1 for label in labels}
    total_capacity = sum(capacity.values())
    if total_capacity == 0:
        raise InvalidArgument(
            "every label has a single row, so none can go to validation without leaving "
            "training: add rows or give dataset.validation_uri",
            field="dataset.validation_fraction",
        )
    rng = random.Random(seed)
    target = min(max(1, round(len(examples) * fraction)), total_capacity)
    exact = {label: len(by_label[label]) * fraction for label in labels}
    quota = {label: min(capacity[label], math.floor(exact[label])) for label in labels}
    # Largest remainder first; the seeded tie-break keeps equal remainders from always
    # favouring the alphabetically first labels.
    order = sorted(labels, key=lambda label: (-(exact[label] - quota[label]), rng.random()))
    remaining = target - sum(quota.values())
    while remaining > 0:
        for label in order:
            if remaining and quota[label] < capacity[label]:
                quota[label] += 1
                remaining -= 1
    validation_indices: set[int] = set()
    for label in labels:
        indices = list(by_label[label])
        rng.shuffle(indices)
        validation_indices.update(indices[: quota[label]])
    return _partition(examples, validation_indices)


def _random_split(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    if len(examples) < 2:
        raise InvalidArgument(
            f"{len(examples)} row cannot be split into training and validation: add rows or "
            "give dataset.validation_uri",
            field="dataset.validation_fraction",
        )
    n_validation = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    indices = list(range(len(examples)))
    random.Random(seed).shuffle(indices)
    return _partition(examples, set(indices[:n_validation]))


def _partition(
    examples: Sequence[Example], validation_indices: set[int]
) -> tuple[list[Example], list[Example]]:
    # File order on both sides: the split decides membership, the data loader shuffles.
    train = [ex for i, ex in enumerate(examples) if i not in validation_indices]
    validation = [ex for i, ex in enumerate(examples) if i in validation_indices]
    return train, validation


def _fingerprint(
    spec: DatasetSpec, min_samples_per_class: int, files: list[tuple[str, bytes]]
) -> str:
    settings: dict[str, Any] = {
        "version": _FINGERPRINT_VERSION,
        "task": spec.task.value,
        "fields": [spec.text_field, spec.label_field, spec.prompt_field, spec.target_field],
        "seed": spec.seed,
        "min_samples_per_class": min_samples_per_class,
        # The file paths are left out on purpose: the same bytes elsewhere are the same data.
        "validation": "file" if spec.validation_uri else spec.validation_fraction,
        "formats": [kind for kind, _raw in files],
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for _kind, raw in files:
        # Length-prefixed, so the boundary between two files cannot move unnoticed.
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


# ---- outputs ---------------------------------------------------------------------------


def class_weights_json(stats: ClassStats) -> dict[str, Any]:
    """Return the content of ``class_weights.json``: counts, weights, exclusions, formula."""
    return {
        "labels": {
            label: {"count": count, "weight": stats.weights[label]}
            for label, count in stats.counts.items()
        },
        "excluded": dict(stats.excluded),
        "formula": WEIGHT_FORMULA,
        "imbalance_ratio": stats.imbalance_ratio,
    }


def write_split(data: PreparedData, out_dir: Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and (classification) ``class_weights.json``.

    Rows use the default field names (``text`` / ``label``, ``prompt`` / ``response``), so
    the files load back with a default ``DatasetSpec``. Returns the paths by name
    ("train", "validation", "class_weights").
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    defaults = DatasetSpec(uri="", task=data.task)
    paths = {"train": out_dir / "train.jsonl", "validation": out_dir / "validation.jsonl"}
    for name, examples in (("train", data.train), ("validation", data.validation)):
        lines = [
            json.dumps(_row(example, data.task, defaults), ensure_ascii=False)
            for example in examples
        ]
        _write_text(paths[name], "".join(line + "\n" for line in lines))
    if data.task is Task.CLASSIFICATION and data.stats is not None:
        paths["class_weights"] = out_dir / "class_weights.json"
        content = json.dumps(class_weights_json(data.stats), ensure_ascii=False, indent=2)
        _write_text(paths["class_weights"], content + "\n")
    return paths


def _row(example: Example, task: Task, defaults: DatasetSpec) -> dict[str, str]:
    if task is Task.CLASSIFICATION:
        return {defaults.text_field: example.text, defaults.label_field: example.label}
    return {defaults.prompt_field: example.prompt, defaults.target_field: example.target}


def _write_text(path: Path, content: str) -> None:
    # Through a temporary file, so a reader never sees half a file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(content, encoding="utf-8")
    os.replace(temporary, path)


def class_statistics_table(data: PreparedData) -> list[tuple[str, int, int, float]]:
    """Return ``(label, train rows, validation rows, weight)`` per kept label, most rows first.

    Excluded labels are not rows here (see ``data.stats.excluded``); generation data has
    no classes and gives an empty table.
    """
    if data.stats is None:
        return []
    validation_counts = Counter(example.label for example in data.validation)
    rows = [
        (label, count, validation_counts.get(label, 0), data.stats.weights[label])
        for label, count in data.stats.counts.items()
    ]
    return sorted(rows, key=lambda row: (-row[1], row[0]))
