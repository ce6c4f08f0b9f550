"""Reading the CLI's input files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.inputs import read_items


def test_plain_lines_keep_empty_items(tmp_path: Path) -> None:
    path = tmp_path / "preds.txt"
    path.write_text("Оплата аренды\n\nsecond\n", encoding="utf-8")
    assert read_items(path) == ["Оплата аренды", "", "second"]


def test_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["x", 62, {"label": "y"}]))
    assert read_items(tmp_path / "a.json") == ["x", "62", "y"]
    (tmp_path / "b.jsonl").write_text('"one"\n{"text": "two"}\n\n{"response": "три"}\n')
    assert read_items(tmp_path / "b.jsonl") == ["one", "two", "три"]


def test_bad_object_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('"ok"\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2"):
        read_items(tmp_path / "c.jsonl")
