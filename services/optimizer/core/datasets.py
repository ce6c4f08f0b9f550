"""What the optimizer checks of a study's dataset at creation: files, fields and ranges.

The trainer reads and validates every row when a trial starts; the optimizer only looks
at what would otherwise fail every trial of a study later: a file that is missing or
unreadable, a field the header (CSV) or the first record (JSONL / JSON) lacks, and
numbers out of range. It reads at most the first `_HEAD_BYTES` of each file, without
torch, in whatever thread calls it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.names import excerpt
from services.optimizer.core.records import DatasetRef

_HEAD_BYTES = 1 << 20
_CSV_DELIMITERS = (",", ";", "\t", "|")
_FORMATS = ("csv", "jsonl", "json")


def check_dataset(dataset: DatasetRef) -> None:
    """Raises InvalidArgument naming the first bad field of `dataset`."""
    fraction = dataset.validation_fraction
    if not 0.0 <= fraction < 1.0 or fraction != fraction:
        raise InvalidArgument(
            f"must be at least 0 and below 1 (0 = the default 0.1), got {fraction:g}",
            field="dataset.validation_fraction",
        )
    if dataset.format and dataset.format.lower() not in _FORMATS:
        raise InvalidArgument(
            f"must be one of {', '.join(_FORMATS)} or empty, got '{excerpt(dataset.format)}'",
            field="dataset.format",
        )
    if dataset.classification:
        required = [
            ("dataset.text_field", dataset.text_field or "text"),
            ("dataset.label_field", dataset.label_field or "label"),
        ]
    else:
        required = [
            ("dataset.prompt_field", dataset.prompt_field or "prompt"),
            ("dataset.target_field", dataset.target_field or "response"),
        ]
    for name, uri in (
        ("dataset.uri", dataset.uri),
        ("dataset.validation_uri", dataset.validation_uri),
    ):
        if name == "dataset.validation_uri" and not uri:
            continue
        if not uri:
            raise InvalidArgument("must name the training file", field=name)
        path = Path(uri.removeprefix("file://"))
        if not path.is_file():
            raise InvalidArgument(f"'{excerpt(uri)}' does not exist or is not a file", field=name)
        try:
            with path.open("rb") as f:
                head = f.read(_HEAD_BYTES)
        except OSError as err:
            raise InvalidArgument(
                f"'{excerpt(uri)}' cannot be read ({err.strerror})", field=name
            ) from None
        fields = _fields(head, _format(dataset.format, path), uri, name)
        for field, wanted in required:
            if wanted not in fields:
                raise InvalidArgument(
                    f"'{excerpt(wanted)}' is not a field of {excerpt(uri)} "
                    f"(it has: {', '.join(excerpt(f, 32) for f in sorted(fields)[:20])})",
                    field=field,
                )


def _format(declared: str, path: Path) -> str:
    if declared:
        return declared.lower()
    suffix = path.suffix.lower().lstrip(".")
    return suffix if suffix in _FORMATS else "jsonl"


def _fields(head: bytes, fmt: str, uri: str, name: str) -> set[str]:
    """The field names of the file's header (CSV) or first record (JSON Lines / JSON)."""
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.strip():
        raise InvalidArgument(f"'{excerpt(uri)}' is empty", field=name)
    if fmt == "csv":
        header_line = text.split("\n", 1)[0]
        delimiter = max(_CSV_DELIMITERS, key=header_line.count)
        try:
            header = next(csv.reader(io.StringIO(header_line), delimiter=delimiter))
        except (csv.Error, StopIteration):
            raise InvalidArgument(f"'{excerpt(uri)}' has no CSV header", field=name) from None
        return {column.strip() for column in header}
    first = text.lstrip()
    if fmt == "json" or first.startswith("["):
        # A JSON array: its first object is enough, but it may be cut by the head's size.
        decoder = json.JSONDecoder()
        try:
            item, _ = decoder.raw_decode(first[1:].lstrip())
        except json.JSONDecodeError:
            raise InvalidArgument(
                f"'{excerpt(uri)}' does not start with a JSON object", field=name
            ) from None
    else:
        line = next(line for line in first.splitlines() if line.strip())
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidArgument(
                f"'{excerpt(uri)}' line 1 is not valid JSON ({err.msg})", field=name
            ) from None
    if not isinstance(item, dict):
        raise InvalidArgument(
            f"'{excerpt(uri)}' holds a JSON {type(item).__name__}, not objects", field=name
        )
    return {str(key) for key in item}
