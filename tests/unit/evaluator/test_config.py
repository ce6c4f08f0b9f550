"""The evaluator's settings: LORATUNE_BERTSCORE_RESCALE's values, old and new."""

from __future__ import annotations

import pydantic
import pytest

from services.evaluator.config import DEFAULT_BERTSCORE_RESCALE, EvaluatorSettings
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.core.rescaling import RescaleMode
from services.evaluator.main import build_evaluator


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("true", RescaleMode.PACKAGED),  # the old boolean keeps its meaning
        ("True", RescaleMode.PACKAGED),
        ("1", RescaleMode.PACKAGED),
        ("yes", RescaleMode.PACKAGED),
        ("false", RescaleMode.NONE),
        ("0", RescaleMode.NONE),
        ("NO", RescaleMode.NONE),
        ("none", RescaleMode.NONE),
        ("packaged", RescaleMode.PACKAGED),
        (" References ", RescaleMode.REFERENCES),
    ],
)
def test_rescale_variable_values(
    monkeypatch: pytest.MonkeyPatch, value: str, mode: RescaleMode
) -> None:
    monkeypatch.setenv("LORATUNE_BERTSCORE_RESCALE", value)
    assert EvaluatorSettings().bertscore_rescale is mode


def test_rescale_from_code_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORATUNE_BERTSCORE_RESCALE", raising=False)
    assert (
        EvaluatorSettings().bertscore_rescale is DEFAULT_BERTSCORE_RESCALE is RescaleMode.REFERENCES
    )
    assert EvaluatorSettings(bertscore_rescale=True).bertscore_rescale is RescaleMode.PACKAGED
    assert EvaluatorSettings(bertscore_rescale=False).bertscore_rescale is RescaleMode.NONE
    settings = EvaluatorSettings(bertscore_rescale=RescaleMode.REFERENCES)
    assert settings.bertscore_rescale is RescaleMode.REFERENCES


@pytest.mark.parametrize("value", ["maybe", "2", "refs", ""])
def test_bad_rescale_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LORATUNE_BERTSCORE_RESCALE", value)
    with pytest.raises(pydantic.ValidationError) as caught:
        EvaluatorSettings()
    message = str(caught.value)
    assert "LORATUNE_BERTSCORE_RESCALE must be none, packaged or references" in message
    assert repr(value) in message


def test_packaged_rescale_without_a_packaged_baseline_fails_at_start_up() -> None:
    settings = EvaluatorSettings(
        bertscore_model=packaged_minilm_path(), bertscore_layers=6, bertscore_rescale="packaged"
    )
    with pytest.raises(ValueError, match="LORATUNE_BERTSCORE_RESCALE=packaged cannot be used"):
        build_evaluator(settings)
    # The hub default (roberta-large, English) has one; checking it loads no model.
    build_evaluator(EvaluatorSettings(bertscore_rescale="packaged"))
    with pytest.raises(ValueError, match="no baseline file"):
        build_evaluator(EvaluatorSettings(bertscore_rescale="packaged", bertscore_lang="xx"))
