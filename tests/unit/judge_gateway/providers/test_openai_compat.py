"""OpenAICompatibleProvider against a fake OpenAI-compatible server (vLLM / Ollama)."""

from __future__ import annotations

import asyncio
import email.utils
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
from services.judge_gateway.core.providers.openai_compat import OpenAICompatibleProvider
from tests.fakes.http import DEFAULT_JUDGMENT, JUDGMENT_SCHEMA, Reply, approx_tokens
from tests.fakes.openai import FakeOpenAI
from tests.unit.judge_gateway.providers._support import (
    SYSTEM_INSTRUCTION,
    USER_PROMPT,
    assert_secrets_absent,
    judge_request,
)

MODEL = "Qwen/Qwen3-8B"
KEY = "sk-local-test-key"


@pytest.fixture
async def provider(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAICompatibleProvider]:
    provider = OpenAICompatibleProvider(fake_openai.url)
    yield provider
    await provider.aclose()


async def _error(provider: OpenAICompatibleProvider, **overrides: object) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request(MODEL, **overrides))
    return caught.value


async def test_success_and_request_on_the_wire(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    reply = await provider.generate(judge_request(MODEL, max_output_tokens=300))

    assert json.loads(reply.text) == DEFAULT_JUDGMENT
    assert reply.finish_reason is FinishReason.STOP
    assert reply.model_version == MODEL
    assert reply.input_tokens == approx_tokens(SYSTEM_INSTRUCTION) + approx_tokens(USER_PROMPT)
    assert reply.output_tokens == approx_tokens(reply.text)
    assert provider.api_version == "v1"

    [request] = fake_openai.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.header("authorization") is None
    assert request.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_INSTRUCTION},
            {"role": "user", "content": USER_PROMPT},
        ],
        "temperature": 0.0,
        "max_tokens": 300,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "judgment", "schema": JUDGMENT_SCHEMA, "strict": True},
        },
    }


async def test_api_key_is_sent_as_bearer() -> None:
    with FakeOpenAI(api_key=KEY) as fake:
        provider = OpenAICompatibleProvider(fake.url + "/", api_key=KEY)
        try:
            await provider.generate(judge_request(MODEL))
        finally:
            await provider.aclose()
        assert fake.requests[0].header("authorization") == f"Bearer {KEY}"
        assert fake.requests[0].path == "/v1/chat/completions"


async def test_wrong_api_key_is_unauthenticated() -> None:
    with FakeOpenAI(api_key=KEY) as fake:
        provider = OpenAICompatibleProvider(fake.url, api_key="sk-wrong")
        try:
            error = await _error(provider)
        finally:
            await provider.aclose()
    assert error.kind is ProviderErrorKind.UNAUTHENTICATED


async def test_unknown_model_is_model_not_found(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.models = {MODEL}

    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request("llama-0b"))

    assert caught.value.kind is ProviderErrorKind.MODEL_NOT_FOUND
    assert "does not exist" in caught.value.message


def _http_date(offset: float) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (2, 2.0),
        ("0.5", 0.5),
        (_http_date, 60.0),  # made when the test runs, 60 s ahead
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
    ],
)
async def test_rate_limit_retry_after_seconds_or_http_date(
    fake_openai: FakeOpenAI,
    provider: OpenAICompatibleProvider,
    retry_after: object,
    expected: float | None,
) -> None:
    value = retry_after(60) if callable(retry_after) else retry_after
    assert isinstance(value, int | str)
    fake_openai.script(Reply.error(429, retry_after=value))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.RATE_LIMITED
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=2)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, ProviderErrorKind.SERVER),
        (503, ProviderErrorKind.SERVER),
        (401, ProviderErrorKind.UNAUTHENTICATED),
        (403, ProviderErrorKind.PERMISSION_DENIED),
        (404, ProviderErrorKind.MODEL_NOT_FOUND),
        (408, ProviderErrorKind.TIMEOUT),
        (400, ProviderErrorKind.BAD_REQUEST),
        (422, ProviderErrorKind.BAD_REQUEST),
    ],
)
async def test_status_mapping_with_one_attempt(
    fake_openai: FakeOpenAI,
    provider: OpenAICompatibleProvider,
    status: int,
    kind: ProviderErrorKind,
) -> None:
    fake_openai.script(Reply.error(status, message="vLLM says no"))

    error = await _error(provider)

    assert error.kind is kind
    assert error.status == status
    assert "vLLM says no" in error.message
    assert len(fake_openai.requests) == 1


async def test_vllm_style_error_body(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.script(
        Reply(
            status=400,
            body={
                "object": "error",
                "message": "max_tokens is too large",
                "type": "BadRequestError",
                "code": 400,
            },
        )
    )

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.BAD_REQUEST
    assert "max_tokens is too large" in error.message


async def test_slow_reply_times_out(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.script(Reply.slow(3.0))

    started = time.monotonic()
    error = await _error(provider, timeout=0.3)

    assert error.kind is ProviderErrorKind.TIMEOUT
    assert time.monotonic() - started < 1.5


async def test_connection_refused_is_transport(refused_url: str) -> None:
    provider = OpenAICompatibleProvider(f"{refused_url}/v1")
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.kind is ProviderErrorKind.TRANSPORT


async def test_dropped_connection_is_transport(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.script(Reply.disconnect())

    assert (await _error(provider)).kind is ProviderErrorKind.TRANSPORT


async def test_max_tokens_with_null_content(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.script(Reply.max_tokens_empty())

    reply = await provider.generate(judge_request(MODEL))

    assert reply.text == ""
    assert reply.finish_reason is FinishReason.MAX_TOKENS


async def test_malformed_body_is_a_server_error(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    fake_openai.script(Reply.malformed())

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.SERVER
    assert error.status == 200


async def test_api_key_leaks_nowhere(refused_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[ProviderError] = []
    with FakeOpenAI(api_key=KEY) as fake:
        provider = OpenAICompatibleProvider(fake.url, api_key=KEY)
        elsewhere = OpenAICompatibleProvider(f"{refused_url}/v1", api_key=KEY)
        fake.script(
            Reply.error(400, message=f"bad request from key {KEY}"),  # an echoing server
            Reply.error(429, retry_after=1),
            Reply.error(500),
            Reply.malformed(),
            Reply.disconnect(),
            Reply.slow(2.0),
        )
        try:
            while fake.pending:
                with pytest.raises(ProviderError) as caught:
                    await provider.generate(judge_request(MODEL, timeout=0.3))
                errors.append(caught.value)
            with pytest.raises(ProviderError) as caught:
                await elsewhere.generate(judge_request(MODEL))
            errors.append(caught.value)
        finally:
            await provider.aclose()
            await elsewhere.aclose()

    assert len(errors) == 7
    assert "[redacted]" in errors[0].message
    assert_secrets_absent(
        [KEY], errors=errors, texts=[repr(provider), str(provider)], records=caplog.records
    )


async def test_more_than_twenty_calls_at_once_keep_their_connections(
    fake_openai: FakeOpenAI, provider: OpenAICompatibleProvider
) -> None:
    # httpx's default pool keeps 20 connections alive and, past 20 open, closes each one
    # a call frees: under a cap of 30 nearly every call would open a new connection.
    fake_openai.latency = 0.2
    for _ in range(3):
        await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(30)))

    assert fake_openai.peak_concurrency == 30
    assert fake_openai.connections_opened == 30
