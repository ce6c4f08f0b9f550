"""build_provider: the provider type picks the adapter, options configure it."""

from __future__ import annotations

import pytest

from services.judge_gateway.core.providers.factory import build_provider
from services.judge_gateway.core.providers.gemini import GeminiProvider
from services.judge_gateway.core.providers.gigachat import GigaChatProvider
from services.judge_gateway.core.providers.openai_compat import OpenAICompatibleProvider
from tests.fakes.gemini import FakeGemini
from tests.fakes.gigachat import DEFAULT_CREDENTIALS, FakeGigaChat
from tests.fakes.openai import FakeOpenAI
from tests.unit.judge_gateway.providers._support import judge_request


async def test_gemini_from_options(fake_gemini: FakeGemini) -> None:
    provider = build_provider(
        "gemini",
        {"api_key": fake_gemini.api_key, "base_url": fake_gemini.url, "api_version": "v1beta"},
    )
    try:
        assert isinstance(provider, GeminiProvider)
        assert (provider.provider_type, provider.api_version) == ("gemini", "v1beta")
        reply = await provider.generate(judge_request("gemini-2.5-flash"))
    finally:
        await provider.aclose()
    assert reply.text
    assert fake_gemini.requests[0].header("x-goog-api-key") == fake_gemini.api_key


async def test_gigachat_from_options(fake_gigachat: FakeGigaChat) -> None:
    provider = build_provider(
        "gigachat",
        {
            "credentials": DEFAULT_CREDENTIALS,
            "scope": "GIGACHAT_API_B2B",
            "base_url": fake_gigachat.url,
            "auth_url": fake_gigachat.auth_url,
            "verify_ssl_certs": "false",
            "ca_bundle_file": "",
        },
    )
    try:
        assert isinstance(provider, GigaChatProvider)
        assert (provider.provider_type, provider.api_version) == ("gigachat", "v1")
        reply = await provider.generate(judge_request("GigaChat-2-Max"))
    finally:
        await provider.aclose()
    assert reply.text
    assert fake_gigachat.requests[0].body == {"scope": "GIGACHAT_API_B2B"}


async def test_openai_from_options(fake_openai: FakeOpenAI) -> None:
    provider = build_provider("openai", {"base_url": fake_openai.url, "api_key": "sk-x"})
    try:
        assert isinstance(provider, OpenAICompatibleProvider)
        assert (provider.provider_type, provider.api_version) == ("openai", "v1")
        reply = await provider.generate(judge_request("qwen3:8b"))
    finally:
        await provider.aclose()
    assert reply.text
    assert fake_openai.requests[0].header("authorization") == "Bearer sk-x"


async def test_gemini_defaults() -> None:
    provider = build_provider("gemini", {"api_key": "k"})
    try:
        assert provider.api_version == "v1beta"
        assert "generativelanguage.googleapis.com" in repr(provider)
    finally:
        await provider.aclose()


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown judge provider type 'claude'"):
        build_provider("claude", {})


@pytest.mark.parametrize(
    ("provider_type", "options", "missing"),
    [
        ("gemini", {"base_url": "http://x"}, "api_key"),
        ("gemini", {"api_key": "  "}, "api_key"),
        ("gigachat", {"scope": "GIGACHAT_API_PERS"}, "credentials"),
        ("openai", {"api_key": "sk-secret-value"}, "base_url"),
    ],
)
def test_missing_required_option_is_named_without_values(
    provider_type: str, options: dict[str, str], missing: str
) -> None:
    with pytest.raises(ValueError) as caught:
        build_provider(provider_type, options)
    assert repr(missing) in str(caught.value)
    assert "sk-secret-value" not in str(caught.value)


def test_unreadable_flag_is_rejected() -> None:
    with pytest.raises(ValueError, match="verify_ssl_certs"):
        build_provider(
            "gigachat", {"credentials": DEFAULT_CREDENTIALS, "verify_ssl_certs": "maybe"}
        )
