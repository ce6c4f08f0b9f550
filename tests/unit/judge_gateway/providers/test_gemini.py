"""GeminiProvider through the real google-genai SDK against a fake Gemini API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest

from services.judge_gateway.core.providers.base import (
    FinishReason,
    ProviderError,
    ProviderErrorKind,
)
from services.judge_gateway.core.providers.gemini import GeminiProvider
from tests.fakes.gemini import PER_DAY_QUOTA, PER_MINUTE_QUOTA, FakeGemini, quota_error
from tests.fakes.http import DEFAULT_JUDGMENT, JUDGMENT_SCHEMA, Reply, approx_tokens
from tests.unit.judge_gateway.providers._support import (
    SYSTEM_INSTRUCTION,
    USER_PROMPT,
    assert_secrets_absent,
    judge_request,
)

MODEL = "gemini-2.5-flash"


@pytest.fixture
async def provider(fake_gemini: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(fake_gemini.api_key, base_url=fake_gemini.url)
    yield provider
    await provider.aclose()


async def _error(provider: GeminiProvider, **overrides: object) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request(MODEL, **overrides))
    return caught.value


async def test_success_returns_text_finish_tokens_and_model_version(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.model_version = "gemini-2.5-flash-preview-09-2025"

    reply = await provider.generate(judge_request(MODEL))

    assert json.loads(reply.text) == DEFAULT_JUDGMENT
    assert reply.finish_reason is FinishReason.STOP
    assert reply.model_version == "gemini-2.5-flash-preview-09-2025"
    # The fake counts words: of systemInstruction + contents in, of the text out.
    assert reply.input_tokens == approx_tokens(SYSTEM_INSTRUCTION) + approx_tokens(USER_PROMPT)
    assert reply.output_tokens == approx_tokens(reply.text)


async def test_request_on_the_wire(fake_gemini: FakeGemini, provider: GeminiProvider) -> None:
    await provider.generate(judge_request(MODEL, max_output_tokens=300))

    [request] = fake_gemini.requests
    assert request.method == "POST"
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.header("x-goog-api-key") == fake_gemini.api_key
    assert request.body["contents"] == [{"role": "user", "parts": [{"text": USER_PROMPT}]}]
    assert request.body["systemInstruction"]["parts"] == [{"text": SYSTEM_INSTRUCTION}]
    config = request.body["generationConfig"]
    assert config["temperature"] == 0
    assert config["maxOutputTokens"] == 300
    assert config["candidateCount"] == 1
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == JUDGMENT_SCHEMA
    assert "responseSchema" not in config


async def test_api_version_is_pinned() -> None:
    with FakeGemini(api_version="v1") as fake:
        provider = GeminiProvider(fake.api_key, base_url=fake.url, api_version="v1")
        try:
            await provider.generate(judge_request(MODEL))
        finally:
            await provider.aclose()
        assert provider.api_version == "v1"
        assert fake.requests[0].path == f"/v1/models/{MODEL}:generateContent"


async def test_model_version_falls_back_to_the_requested_model(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(
        Reply(
            body={
                "candidates": [
                    {
                        "content": {"parts": [{"text": "{}"}], "role": "model"},
                        "finishReason": "STOP",
                    }
                ]
            }
        )
    )

    reply = await provider.generate(judge_request(MODEL))

    assert reply.model_version == MODEL
    assert (reply.input_tokens, reply.output_tokens) == (0, 0)


async def test_rate_limit_with_retry_after_header(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(Reply.error(429, retry_after=2))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.RATE_LIMITED
    assert error.kind.retryable
    assert error.retry_after == 2.0
    assert error.status == 429
    # 429 is in the SDK's default retry list: one request proves its retries are off.
    assert len(fake_gemini.requests) == 1


async def test_per_minute_quota_is_rate_limited_with_retry_info_delay(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(quota_error(PER_MINUTE_QUOTA, retry_delay="7s"))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.RATE_LIMITED
    assert error.retry_after == 7.0


async def test_per_day_quota_is_exhausted_not_retryable(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(quota_error(PER_DAY_QUOTA, retry_delay="43200s"))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.QUOTA_EXHAUSTED
    assert not error.kind.retryable
    assert len(fake_gemini.requests) == 1


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, ProviderErrorKind.SERVER),
        (503, ProviderErrorKind.SERVER),
        (504, ProviderErrorKind.SERVER),
        (401, ProviderErrorKind.UNAUTHENTICATED),
        (403, ProviderErrorKind.PERMISSION_DENIED),
        (404, ProviderErrorKind.MODEL_NOT_FOUND),
        (408, ProviderErrorKind.TIMEOUT),
        (400, ProviderErrorKind.BAD_REQUEST),
        (409, ProviderErrorKind.BAD_REQUEST),
    ],
)
async def test_status_mapping_with_one_attempt(
    fake_gemini: FakeGemini, provider: GeminiProvider, status: int, kind: ProviderErrorKind
) -> None:
    fake_gemini.script(Reply.error(status))

    error = await _error(provider)

    assert error.kind is kind
    assert error.status == status
    assert error.retry_after is None
    assert len(fake_gemini.requests) == 1


async def test_wrong_api_key_is_unauthenticated(fake_gemini: FakeGemini) -> None:
    provider = GeminiProvider("not-the-key", base_url=fake_gemini.url)
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    # Gemini answers 400 INVALID_ARGUMENT (reason API_KEY_INVALID), not 401.
    assert error.status == 400
    assert error.kind is ProviderErrorKind.UNAUTHENTICATED


async def test_unknown_model_is_model_not_found(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.models = {MODEL}

    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request("gemini-0.1-nonexistent"))

    assert caught.value.kind is ProviderErrorKind.MODEL_NOT_FOUND
    assert "gemini-0.1-nonexistent" in caught.value.message


async def test_slow_reply_times_out_at_the_request_timeout(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(Reply.slow(3.0))

    started = time.monotonic()
    error = await _error(provider, timeout=0.3)

    assert error.kind is ProviderErrorKind.TIMEOUT
    assert time.monotonic() - started < 1.5
    assert len(fake_gemini.requests) == 1


async def test_connection_refused_is_transport_without_hidden_retry(refused_url: str) -> None:
    provider = GeminiProvider("test-gemini-key", base_url=refused_url)
    started = time.monotonic()
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.kind is ProviderErrorKind.TRANSPORT
    # Left to itself the SDK sleeps 1-10 s and retries a refused connection once.
    assert time.monotonic() - started < 1.0


async def test_dropped_connection_is_transport(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(Reply.disconnect())

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.TRANSPORT
    assert len(fake_gemini.requests) == 1


async def test_max_tokens_without_text(fake_gemini: FakeGemini, provider: GeminiProvider) -> None:
    fake_gemini.script(Reply.max_tokens_empty())

    reply = await provider.generate(judge_request(MODEL, max_output_tokens=64))

    assert reply.text == ""
    assert reply.finish_reason is FinishReason.MAX_TOKENS
    assert reply.output_tokens == 64  # all of it thoughts


async def test_malformed_body_is_a_server_error(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(Reply.malformed())

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.SERVER
    assert error.status == 200


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("SAFETY", FinishReason.SAFETY),
        ("PROHIBITED_CONTENT", FinishReason.SAFETY),
        ("RECITATION", FinishReason.OTHER),
        ("MALFORMED_FUNCTION_CALL", FinishReason.OTHER),
    ],
)
async def test_finish_reasons(
    fake_gemini: FakeGemini, provider: GeminiProvider, finish: str, expected: FinishReason
) -> None:
    fake_gemini.script(Reply.json_text('{"reasoning": "x", "score": 1}', finish=finish))

    reply = await provider.generate(judge_request(MODEL))

    assert reply.finish_reason is expected


async def test_blocked_prompt_has_no_candidates(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(
        Reply(body={"promptFeedback": {"blockReason": "SAFETY"}, "modelVersion": MODEL})
    )

    reply = await provider.generate(judge_request(MODEL))

    assert reply.text == ""
    assert reply.finish_reason is FinishReason.SAFETY


async def test_concurrent_calls_share_one_client(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.latency = 0.5

    started = time.monotonic()
    replies = await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(50)))

    assert all(reply.finish_reason is FinishReason.STOP for reply in replies)
    assert fake_gemini.peak_concurrency >= 40  # side by side, not queued behind each other
    assert time.monotonic() - started < 5.0


async def test_the_key_leaks_nowhere(
    fake_gemini: FakeGemini, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = fake_gemini.api_key
    provider = GeminiProvider(key, base_url=fake_gemini.url)
    elsewhere = GeminiProvider(key, base_url=refused_url)
    await provider.generate(judge_request(MODEL))
    fake_gemini.script(
        Reply.error(400, message=f"API key not valid: {key}"),  # a server that echoes it
        Reply.error(429, retry_after=1),
        quota_error(PER_DAY_QUOTA),
        Reply.error(500),
        Reply.malformed(),
        Reply.disconnect(),
        Reply.slow(2.0),
    )
    errors = []
    try:
        for _ in range(fake_gemini.pending):
            with pytest.raises(ProviderError) as caught:
                await provider.generate(judge_request(MODEL, timeout=0.3))
            errors.append(caught.value)
        with pytest.raises(ProviderError) as caught:
            await elsewhere.generate(judge_request(MODEL))
        errors.append(caught.value)
    finally:
        await provider.aclose()
        await elsewhere.aclose()

    assert len(errors) == 8
    assert "[redacted]" in errors[0].message
    assert_secrets_absent(
        [key],
        errors=errors,
        texts=[repr(provider), str(provider)],
        records=caplog.records,
    )
