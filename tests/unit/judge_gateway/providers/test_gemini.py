"""GeminiProvider through the real google-genai SDK against a fake Gemini API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import models as genai_models
from google.genai import types

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


async def test_request_is_what_the_sdk_sends(fake_gemini: FakeGemini) -> None:
    # The body is written by hand (the SDK's request models cost more CPU than the HTTP
    # exchange): it must stay what the SDK's own generate_content puts on the wire.
    sdk = genai.Client(
        vertexai=False,
        api_key=fake_gemini.api_key,
        http_options=types.HttpOptions(
            base_url=fake_gemini.url,
            api_version="v1beta",
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )
    request = judge_request(MODEL, max_output_tokens=300, temperature=0.2)
    try:
        await sdk.aio.models.generate_content(
            model=MODEL,
            contents=[types.Content(role="user", parts=[types.Part(text=request.user_prompt)])],
            config=types.GenerateContentConfig(
                system_instruction=request.system_instruction,
                temperature=request.temperature,
                max_output_tokens=request.max_output_tokens,
                candidate_count=1,
                response_mime_type="application/json",
                response_json_schema=request.response_schema,
                automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
                automatic_continuation=False,
                http_options=types.HttpOptions(timeout=5000),
            ),
        )
    finally:
        await sdk.aio.aclose()
        sdk.close()
    provider = GeminiProvider(fake_gemini.api_key, base_url=fake_gemini.url)
    try:
        await provider.generate(request)
    finally:
        await provider.aclose()

    by_sdk, ours = fake_gemini.requests
    assert ours.path == by_sdk.path
    assert ours.body == by_sdk.body
    for header in ("x-goog-api-key", "x-goog-api-client", "user-agent", "content-type"):
        assert ours.header(header) == by_sdk.header(header), header


async def test_a_call_builds_none_of_the_sdk_models(
    fake_gemini: FakeGemini, provider: GeminiProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # generate_content validates pydantic request and reply models: 1.5-2 ms of the event
    # loop per call, which 16 calls in flight pay one after another.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the SDK's request / reply models were built")

    monkeypatch.setattr(genai_models, "_GenerateContentParameters_to_mldev", refuse)
    monkeypatch.setattr(types.GenerateContentResponse, "_from_response", refuse)

    reply = await provider.generate(judge_request(MODEL))

    assert json.loads(reply.text) == DEFAULT_JUDGMENT


async def test_thought_parts_are_not_the_judgment(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    fake_gemini.script(
        Reply(
            body={
                "candidates": [
                    {
                        "content": {
                            "parts": [
                                {"text": "Let me weigh the facts.", "thought": True},
                                {"text": '{"reasoning": "ok", '},
                                {"text": '"score": 70}'},
                            ],
                            "role": "model",
                        },
                        "finishReason": "STOP",
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": 12,
                    "candidatesTokenCount": 8,
                    "thoughtsTokenCount": 30,
                },
                "modelVersion": MODEL,
            }
        )
    )

    reply = await provider.generate(judge_request(MODEL))

    assert json.loads(reply.text) == {"reasoning": "ok", "score": 70}
    assert (reply.input_tokens, reply.output_tokens) == (12, 38)


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        {"candidates": "none"},
        {"candidates": ["not an object"]},
        {"candidates": [{"content": {"parts": [{"text": 7}]}}]},
        {"candidates": [{"content": {"parts": "text"}}]},
        {"usageMetadata": {"promptTokenCount": "many"}},
        {"modelVersion": 2},
    ],
)
async def test_reply_of_another_shape_is_a_server_error(
    fake_gemini: FakeGemini, provider: GeminiProvider, body: object
) -> None:
    fake_gemini.script(Reply(body=body))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.SERVER
    assert error.status == 200


@pytest.mark.parametrize(
    ("model", "path"),
    [
        (MODEL, f"/v1beta/models/{MODEL}:generateContent"),
        (f"models/{MODEL}", f"/v1beta/models/{MODEL}:generateContent"),
        ("tunedModels/my-judge", "/v1beta/tunedModels/my-judge:generateContent"),
    ],
)
async def test_model_names_become_resource_paths(
    fake_gemini: FakeGemini, provider: GeminiProvider, model: str, path: str
) -> None:
    with contextlib.suppress(ProviderError):  # the fake serves no tuned models
        await provider.generate(judge_request(model))

    assert fake_gemini.requests[0].path == path


async def test_an_unsafe_model_name_is_a_bad_request_never_sent(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request("../files?x=1"))
    error = caught.value

    assert error.kind is ProviderErrorKind.BAD_REQUEST
    assert fake_gemini.requests == []


async def test_more_than_twenty_calls_at_once_keep_their_connections(
    fake_gemini: FakeGemini, provider: GeminiProvider
) -> None:
    # httpx's default pool keeps 20 connections alive and, past 20 open, closes each one
    # a call frees: under a cap of 30 nearly every call would open a new connection.
    fake_gemini.latency = 0.2
    for _ in range(3):
        await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(30)))

    assert fake_gemini.peak_concurrency == 30
    assert fake_gemini.connections_opened == 30
