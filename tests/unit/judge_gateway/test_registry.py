"""The registry: built-in models, the config file, defaults, credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common import errors
from services.judge_gateway.core.registry import JudgeRegistry


def test_builtins_and_availability() -> None:
    registry = JudgeRegistry.from_environment({"GEMINI_API_KEY": "k"})
    models = {m.spec.id: m for m in registry.models()}
    assert set(models) == {"gemini", "gigachat"}
    assert models["gemini"].available and not models["gigachat"].available
    assert models["gigachat"].missing == ("GIGACHAT_CREDENTIALS",)
    assert models["gigachat"].spec.options["scope"] == "GIGACHAT_API_PERS"
    assert models["gigachat"].spec.options["verify_ssl_certs"] == "true"
    assert models["gemini"].spec.options["api_version"] == "v1beta"
    assert registry.default_id == "gemini"


def test_unknown_id_is_not_found_listing_ids() -> None:
    registry = JudgeRegistry.from_environment({})
    with pytest.raises(errors.NotFound) as caught:
        registry.resolve("x")
    assert str(caught.value) == "LLM Judge model not found: 'x' (available: gemini, gigachat)"


def test_missing_credentials_name_the_variable_never_a_value() -> None:
    registry = JudgeRegistry.from_environment({"GEMINI_API_KEY": "secret-value"})
    with pytest.raises(errors.FailedPrecondition, match="set GIGACHAT_CREDENTIALS"):
        registry.resolve("gigachat")
    assert registry.resolve("").spec.id == "gemini"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_adds_models_and_default(tmp_path: Path, suffix: str) -> None:
    config = {
        "models": [
            {
                "id": "local-qwen",
                "provider": "openai",
                "model": "qwen2.5-7b",
                "base_url": "http://127.0.0.1:8000/v1",
                "max_concurrency": 3,
                "default": True,
            },
            {"id": "gemini-pro", "provider": "gemini", "model": "gemini-2.5-pro"},
        ]
    }
    path = tmp_path / f"judges{suffix}"
    path.write_text(json.dumps(config))  # JSON is valid YAML too
    registry = JudgeRegistry.from_environment({"GEMINI_API_KEY": "k"}, path)
    assert [m.spec.id for m in registry.models()] == [
        "gemini",
        "gigachat",
        "local-qwen",
        "gemini-pro",
    ]
    assert registry.default_id == "local-qwen"
    assert registry.resolve("local-qwen").available  # no key needed for a local judge
    pro = registry.resolve("gemini-pro")
    assert pro.secrets == {"api_key": "k"} and pro.spec.max_concurrency == 0
    chosen = JudgeRegistry.from_environment({"GEMINI_API_KEY": "k"}, path, default_id="gemini")
    assert chosen.default_id == "gemini"


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - id: a\n    provider: claude\n    model: m\n")
    with pytest.raises(errors.InvalidArgument, match=r"models\[0\]: provider must be one of"):
        JudgeRegistry.from_environment({}, path)
    with pytest.raises(errors.InvalidArgument, match="LORATUNE_JUDGE_DEFAULT"):
        JudgeRegistry.from_environment({}, None, default_id="nope")


def test_unknown_id_is_echoed_only_as_a_short_escaped_excerpt() -> None:
    registry = JudgeRegistry.from_environment({})
    with pytest.raises(errors.NotFound) as caught:
        registry.resolve("evil\n2026-01-01 INFO forged\x1b[31m" + "x" * 100)
    message = str(caught.value)
    assert message.startswith("LLM Judge model not found: 'evil\\n2026-01-01 INFO forged\\x1b")
    assert "... (132 chars)' (available: gemini, gigachat)" in message
    assert len(message) < 160 and "\n" not in message and "\x1b" not in message
