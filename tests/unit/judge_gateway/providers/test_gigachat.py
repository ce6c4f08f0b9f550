"""GigaChatProvider through the real gigachat SDK against a fake GigaChat API and OAuth server."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator

import certifi
import pytest

from services.judge_gateway.core.providers.base import (
    FinishReason,
    ProviderError,
    ProviderErrorKind,
)
from services.judge_gateway.core.providers.gigachat import GigaChatProvider
from tests.fakes.gigachat import DEFAULT_CREDENTIALS, FakeGigaChat
from tests.fakes.http import (
    DEFAULT_JUDGMENT,
    JUDGMENT_SCHEMA,
    RecordedRequest,
    Reply,
    approx_tokens,
)
from tests.unit.judge_gateway.providers._support import (
    SYSTEM_INSTRUCTION,
    USER_PROMPT,
    assert_secrets_absent,
    judge_request,
)

MODEL = "GigaChat-2-Max"


def _provider(fake: FakeGigaChat, credentials: str = DEFAULT_CREDENTIALS) -> GigaChatProvider:
    return GigaChatProvider(credentials, base_url=fake.url, auth_url=fake.auth_url)


@pytest.fixture
async def provider(fake_gigachat: FakeGigaChat) -> AsyncIterator[GigaChatProvider]:
    provider = _provider(fake_gigachat)
    yield provider
    await provider.aclose()


async def _error(provider: GigaChatProvider, **overrides: object) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request(MODEL, **overrides))
    return caught.value


async def test_success_returns_text_finish_tokens_and_model_version(
    provider: GigaChatProvider,
) -> None:
    reply = await provider.generate(judge_request(MODEL))

    assert json.loads(reply.text) == DEFAULT_JUDGMENT
    assert reply.finish_reason is FinishReason.STOP
    assert reply.model_version == "GigaChat-2-Max:2.0.28.2"
    assert reply.input_tokens == approx_tokens(SYSTEM_INSTRUCTION) + approx_tokens(USER_PROMPT)
    assert reply.output_tokens == approx_tokens(reply.text)
    assert provider.api_version == "v1"


async def test_oauth_and_chat_requests_on_the_wire(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    await provider.generate(judge_request(MODEL, max_output_tokens=300))

    oauth, chat = fake_gigachat.requests
    assert (oauth.method, oauth.path) == ("POST", "/api/v2/oauth")
    assert oauth.header("authorization") == f"Basic {DEFAULT_CREDENTIALS}"
    uuid.UUID(oauth.header("rquid") or "")
    assert oauth.body == {"scope": "GIGACHAT_API_PERS"}

    assert (chat.method, chat.path) == ("POST", "/api/v1/chat/completions")
    assert chat.header("authorization") == f"Bearer {fake_gigachat.issued_tokens[0]}"
    assert chat.body["model"] == MODEL
    assert chat.body["messages"] == [
        {"role": "system", "content": SYSTEM_INSTRUCTION},
        {"role": "user", "content": USER_PROMPT},
    ]
    assert chat.body["temperature"] == 0
    assert chat.body["max_tokens"] == 300
    assert chat.body["response_format"] == {
        "type": "json_schema",
        "schema": JUDGMENT_SCHEMA,
        "strict": True,
    }
    assert "stream" not in chat.body


async def test_token_is_reused_until_it_expires(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    for _ in range(3):
        await provider.generate(judge_request(MODEL))

    assert fake_gigachat.token_requests == 1


async def test_stale_token_reauthenticates_once_then_succeeds(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    await provider.generate(judge_request(MODEL))
    fake_gigachat.expire_tokens()  # the server forgets it; the client still thinks it valid

    reply = await provider.generate(judge_request(MODEL))

    assert reply.finish_reason is FinishReason.STOP
    assert fake_gigachat.token_requests == 2
    first, rejected, repeated = fake_gigachat.chat_requests
    assert rejected.header("authorization") == first.header("authorization")
    assert repeated.header("authorization") == f"Bearer {fake_gigachat.issued_tokens[1]}"


async def test_second_401_after_reauthentication_is_unauthenticated(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    await provider.generate(judge_request(MODEL))
    fake_gigachat.script(Reply.error(401), Reply.error(401))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.UNAUTHENTICATED
    assert fake_gigachat.token_requests == 2  # exactly one re-authentication
    assert len(fake_gigachat.chat_requests) == 3  # the warm-up, the 401, one repeat


async def test_concurrent_calls_without_a_token_fetch_it_once(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.latency = 0.05  # so that the calls overlap

    replies = await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(20)))

    assert all(reply.finish_reason is FinishReason.STOP for reply in replies)
    assert fake_gigachat.token_requests == 1
    tokens = {request.header("authorization") for request in fake_gigachat.chat_requests}
    assert tokens == {f"Bearer {fake_gigachat.issued_tokens[0]}"}
    assert len(fake_gigachat.chat_requests) == 20


async def test_concurrent_calls_with_a_stale_token_reauthenticate_once(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    await provider.generate(judge_request(MODEL))
    fake_gigachat.expire_tokens()
    fake_gigachat.latency = 0.05

    replies = await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(20)))

    assert all(reply.finish_reason is FinishReason.STOP for reply in replies)
    assert fake_gigachat.token_requests == 2


async def test_late_401_keeps_the_token_another_call_already_refreshed(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    await provider.generate(judge_request(MODEL))
    stale = f"Bearer {fake_gigachat.issued_tokens[0]}"
    rejected = 0
    lock = threading.Lock()

    # Two calls send the same token; one 401 comes back at once, the other only after
    # the first call has fetched a new token. The SDK alone would throw the new token
    # away on the late 401 and fetch a third.
    def respond(request: RecordedRequest) -> Reply:
        nonlocal rejected
        if request.header("authorization") != stale:
            return fake_gigachat.default_reply(request)
        with lock:
            rejected += 1
            first = rejected == 1
        return Reply.error(401) if first else Reply.slow(0.5, then=Reply.error(401))

    fake_gigachat.responder = respond

    replies = await asyncio.gather(*(provider.generate(judge_request(MODEL)) for _ in range(2)))

    assert all(reply.finish_reason is FinishReason.STOP for reply in replies)
    assert rejected == 2
    assert fake_gigachat.token_requests == 2


async def test_token_expiring_within_the_sdk_buffer_is_refreshed_before_the_call() -> None:
    # The SDK treats a token that expires within 60 s as unusable and fetches a new one
    # before sending, so such a token never produces a 401 round trip.
    with FakeGigaChat(token_ttl_seconds=30) as fake:
        provider = _provider(fake)
        try:
            await provider.generate(judge_request(MODEL))
            await provider.generate(judge_request(MODEL))
        finally:
            await provider.aclose()
        assert fake.token_requests == 2
        assert len(fake.chat_requests) == 2


async def test_wrong_credentials_are_unauthenticated(fake_gigachat: FakeGigaChat) -> None:
    provider = _provider(fake_gigachat, credentials="d3Jvbmc6Y3JlZGVudGlhbHM=")
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.kind is ProviderErrorKind.UNAUTHENTICATED
    assert error.status == 401
    assert "oauth" in error.message
    assert fake_gigachat.token_requests == 1
    assert fake_gigachat.chat_requests == []


async def test_wrong_auth_url_is_a_bad_request_not_a_missing_model(
    fake_gigachat: FakeGigaChat,
) -> None:
    provider = GigaChatProvider(
        DEFAULT_CREDENTIALS, base_url=fake_gigachat.url, auth_url=f"{fake_gigachat.origin}/oauth"
    )
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.status == 404
    assert error.kind is ProviderErrorKind.BAD_REQUEST


async def test_scope_not_granted_is_a_bad_request(fake_gigachat: FakeGigaChat) -> None:
    fake_gigachat.scopes = ("GIGACHAT_API_PERS",)
    provider = GigaChatProvider(
        DEFAULT_CREDENTIALS,
        scope="GIGACHAT_API_CORP",
        base_url=fake_gigachat.url,
        auth_url=fake_gigachat.auth_url,
    )
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.kind is ProviderErrorKind.BAD_REQUEST
    assert "scope" in error.message
    assert fake_gigachat.requests[0].body == {"scope": "GIGACHAT_API_CORP"}


async def test_oauth_server_error_is_a_server_error(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script_oauth(Reply.error(503))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.SERVER
    assert fake_gigachat.token_requests == 1


async def test_unknown_model_is_model_not_found(provider: GigaChatProvider) -> None:
    with pytest.raises(ProviderError) as caught:
        await provider.generate(judge_request("GigaChat-Nonexistent"))

    assert caught.value.kind is ProviderErrorKind.MODEL_NOT_FOUND
    assert "No such model" in caught.value.message


async def test_rate_limit_with_retry_after(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.error(429, retry_after=2))

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.RATE_LIMITED
    assert error.retry_after == 2.0
    assert len(fake_gigachat.chat_requests) == 1


async def test_rate_limit_with_retry_after_as_http_date(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(
        Reply.error(429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    )

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.RATE_LIMITED
    assert error.retry_after is not None
    assert 25 <= error.retry_after <= 31


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, ProviderErrorKind.SERVER),
        (502, ProviderErrorKind.SERVER),
        (503, ProviderErrorKind.SERVER),
        (403, ProviderErrorKind.PERMISSION_DENIED),
        (404, ProviderErrorKind.MODEL_NOT_FOUND),
        (408, ProviderErrorKind.TIMEOUT),
        (400, ProviderErrorKind.BAD_REQUEST),
        (413, ProviderErrorKind.BAD_REQUEST),
        (422, ProviderErrorKind.BAD_REQUEST),
    ],
)
async def test_status_mapping_with_one_attempt(
    fake_gigachat: FakeGigaChat,
    provider: GigaChatProvider,
    status: int,
    kind: ProviderErrorKind,
) -> None:
    fake_gigachat.script(Reply.error(status))

    error = await _error(provider)

    assert error.kind is kind
    assert error.status == status
    assert len(fake_gigachat.chat_requests) == 1


async def test_slow_reply_times_out_at_the_request_timeout(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.slow(3.0))

    started = time.monotonic()
    error = await _error(provider, timeout=0.3)

    assert error.kind is ProviderErrorKind.TIMEOUT
    assert time.monotonic() - started < 1.5


async def test_connection_refused_is_transport(refused_url: str) -> None:
    provider = GigaChatProvider(
        DEFAULT_CREDENTIALS, base_url=f"{refused_url}/api/v1", auth_url=f"{refused_url}/oauth"
    )
    try:
        error = await _error(provider)
    finally:
        await provider.aclose()

    assert error.kind is ProviderErrorKind.TRANSPORT


async def test_dropped_connection_is_transport(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.disconnect())

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.TRANSPORT
    assert len(fake_gigachat.chat_requests) == 1


async def test_max_tokens_without_text(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.max_tokens_empty())

    reply = await provider.generate(judge_request(MODEL, max_output_tokens=64))

    assert reply.text == ""
    assert reply.finish_reason is FinishReason.MAX_TOKENS
    assert reply.output_tokens == 64


async def test_blacklisted_answer_is_safety(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.json_text("Не могу ответить.", finish="SAFETY"))

    reply = await provider.generate(judge_request(MODEL))

    assert reply.finish_reason is FinishReason.SAFETY


async def test_malformed_body_is_a_server_error(
    fake_gigachat: FakeGigaChat, provider: GigaChatProvider
) -> None:
    fake_gigachat.script(Reply.malformed())

    error = await _error(provider)

    assert error.kind is ProviderErrorKind.SERVER
    assert error.status == 200


async def test_ca_bundle_is_loaded_without_deprecation_warnings(
    fake_gigachat: FakeGigaChat,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        provider = GigaChatProvider(
            DEFAULT_CREDENTIALS,
            base_url=fake_gigachat.url,
            auth_url=fake_gigachat.auth_url,
            ca_bundle_file=certifi.where(),
        )
        try:
            reply = await provider.generate(judge_request(MODEL))
        finally:
            await provider.aclose()

    assert reply.finish_reason is FinishReason.STOP


def test_missing_ca_bundle_fails_at_construction(fake_gigachat: FakeGigaChat) -> None:
    with pytest.raises(FileNotFoundError):
        GigaChatProvider(
            DEFAULT_CREDENTIALS,
            base_url=fake_gigachat.url,
            auth_url=fake_gigachat.auth_url,
            ca_bundle_file="/nonexistent/russian_trusted_root_ca.pem",
        )


async def test_credentials_and_tokens_leak_nowhere(
    fake_gigachat: FakeGigaChat, refused_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = _provider(fake_gigachat)
    wrong = _provider(fake_gigachat, credentials="d3Jvbmc6Y3JlZGVudGlhbHM=")
    elsewhere = GigaChatProvider(
        DEFAULT_CREDENTIALS, base_url=f"{refused_url}/api/v1", auth_url=f"{refused_url}/oauth"
    )
    errors: list[ProviderError] = []
    try:
        await provider.generate(judge_request(MODEL))
        token = fake_gigachat.issued_tokens[0]
        fake_gigachat.script(
            Reply.error(403, message=f"token {token} may not use {MODEL}"),  # an echoing server
            Reply.error(429, retry_after=1),
            Reply.error(500),
            Reply.malformed(),
            Reply.disconnect(),
            Reply.slow(2.0),
            Reply.error(401),
            Reply.error(401),
        )
        while fake_gigachat.pending:
            with pytest.raises(ProviderError) as caught:
                await provider.generate(judge_request(MODEL, timeout=0.3))
            errors.append(caught.value)
        fake_gigachat.expire_tokens()
        await provider.generate(judge_request(MODEL))  # a 401, a new token, a repeat
        for other in (wrong, elsewhere):
            with pytest.raises(ProviderError) as caught:
                await other.generate(judge_request(MODEL))
            errors.append(caught.value)
    finally:
        for each in (provider, wrong, elsewhere):
            await each.aclose()

    assert len(errors) == 9
    assert "[redacted]" in errors[0].message
    assert len(fake_gigachat.issued_tokens) >= 3
    assert_secrets_absent(
        [DEFAULT_CREDENTIALS, "d3Jvbmc6Y3JlZGVudGlhbHM=", *fake_gigachat.issued_tokens],
        errors=errors,
        texts=[repr(provider), str(provider)],
        records=caplog.records,
    )
