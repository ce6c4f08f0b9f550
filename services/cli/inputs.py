"""Reading lists of texts or labels from the files users pass to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

_OBJECT_KEYS = ("text", "prediction", "label", "response", "reference", "prompt")


def _item(value: object, path: Path, line: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict):
        for key in _OBJECT_KEYS:
            if key in value:
                return _item(value[key], path, line)
    raise ValueError(
        f"{path}:{line}: expected a string or an object with one of {', '.join(_OBJECT_KEYS)}"
    )


def read_items(path: Path) -> list[str]:
    """Items of a file: a JSON list (.json), one JSON value a line (.jsonl), else one a line.

    Plain text keeps empty lines as empty items (an empty generation is a real
    prediction); only the newline that ends the file is not an item.
    """
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list")
        return [_item(v, path, i + 1) for i, v in enumerate(data)]
    if suffix == ".jsonl":
        return [
            _item(json.loads(line), path, i + 1)
            for i, line in enumerate(text.splitlines())
            if line.strip()
        ]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]
