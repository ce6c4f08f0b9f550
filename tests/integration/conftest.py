"""Shared data and models of the integration tests (built here: no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.trainer.conftest import build_tiny_qwen


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture
def sentiment(tmp_path: Path) -> Path:
    words = ["good", "great", "bad", "awful"]
    rows = [
        {
            "text": f"w{i % 7} {words[i % 4]} w{i % 5} w{i % 3}",
            "label": "pos" if i % 4 < 2 else "neg",
        }
        for i in range(48)
    ]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
