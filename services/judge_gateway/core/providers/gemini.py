"""The Gemini API as a judge, through google-genai: one attempt per call over our httpx client."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from typing import Any

import httpx
from google import genai
from google.genai import errors, types

from services.judge_gateway.core.providers._common import (
    POOL_LIMITS,
    TRANSPORT_ERRORS,
    kind_for_status,
    parse_duration,
    parse_retry_after,
    redact,
    transport_error,
)
from services.judge_gateway.core.providers.base import (
    FinishReason,
    ProviderError,
    ProviderErrorKind,
    ProviderReply,
    ProviderRequest,
)

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"

_FINISH_REASONS = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.MAX_TOKENS,
    "SAFETY": FinishReason.SAFETY,
    "PROHIBITED_CONTENT": FinishReason.SAFETY,
    "BLOCKLIST": FinishReason.SAFETY,
    "SPII": FinishReason.SAFETY,
    "IMAGE_SAFETY": FinishReason.SAFETY,
}

# Exactly one HTTP attempt: the gateway retries in one layer. Setting retry options at
# all also switches off the SDK's hidden retry of aiohttp connection errors (a 1-10 s
# sleep, then a second attempt), which runs whenever no retry options are given.
_ONE_ATTEMPT = types.HttpRetryOptions(attempts=1)

# A ceiling for the httpx client; each call sets its own, shorter timeout.
_CLIENT_TIMEOUT_S = 600.0

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


class GeminiProvider:
    """A Gemini model as judge: structured JSON output, one HTTP attempt per `generate`.

    The SDK sends through an httpx client owned here: left to itself, google-genai
    sends async requests through aiohttp whenever aiohttp is installed (httpx2 when it is
    not), so errors and retries would depend on what else the image happens to hold.

    A call goes out through the SDK's API client (its URL, key and version headers, its
    APIError for an error status, its one-attempt retry options), but the body is the
    wire JSON written by `request_body` and the reply is read from its JSON. Building
    and validating the SDK's pydantic request and response models cost 1.5-2 ms of
    event-loop CPU per call, more than the HTTP exchange itself; a gateway with 16
    calls in flight spends that CPU one call after another, so every round of calls
    waited for it.
    """

    provider_type = "gemini"

    def __init__(
        self, api_key: str, *, base_url: str | None = None, api_version: str = "v1beta"
    ) -> None:
        if not api_key.strip():
            # An empty key would make the SDK fall back to GOOGLE_API_KEY / GEMINI_API_KEY.
            raise ValueError("GeminiProvider needs a non-empty API key")
        self.api_version = api_version
        self._base_url = base_url or DEFAULT_BASE_URL
        self._secrets = (api_key, api_key.strip())
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(_CLIENT_TIMEOUT_S), limits=POOL_LIMITS)
        self._client = genai.Client(
            # Explicit, so GOOGLE_GENAI_USE_VERTEXAI in the environment cannot reroute calls.
            vertexai=False,
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=self._base_url,
                api_version=api_version,
                retry_options=_ONE_ATTEMPT,
                httpx_async_client=self._http,
            ),
        )
        # What `generate_content` sends through, without its request and reply models.
        self._api = self._client.aio._api_client

    def __repr__(self) -> str:
        return f"GeminiProvider(base_url={self._base_url!r}, api_version={self.api_version!r})"

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        """Asks the model once; every failure becomes a ProviderError."""
        try:
            path = f"{_model_path(request.model)}:generateContent"
        except ValueError as exc:
            raise ProviderError(ProviderErrorKind.BAD_REQUEST, f"gemini: {exc}") from None
        try:
            # httpx's timeout bounds each read; this bounds the whole attempt.
            async with asyncio.timeout(request.timeout):
                response = await self._api.async_request(
                    "post",
                    path,
                    request_body(request),
                    _call_options(max(1, math.ceil(request.timeout * 1000))),
                )
        except errors.APIError as exc:
            raise self._api_error(exc) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_error("gemini", exc, self._secrets) from None
        try:
            payload = json.loads(response.body) if response.body else {}
            if not isinstance(payload, dict):
                raise _Unreadable("not an object")
            return _reply(payload, request.model)
        except (ValueError, _Unreadable) as exc:
            # A 200 whose body is not the JSON it claims to be: the server's fault.
            raise ProviderError(
                ProviderErrorKind.SERVER,
                f"gemini: unreadable response body ({type(exc).__name__})",
                status=200,
            ) from None

    async def aclose(self) -> None:
        """Closes the SDK client and the connections under it."""
        await self._client.aio.aclose()  # leaves our httpx client alone
        self._client.close()  # the sync httpx client the SDK builds but we never use
        await self._http.aclose()

    def _api_error(self, exc: errors.APIError) -> ProviderError:
        status = int(exc.code)
        error = _error_body(exc.details)
        details = [d for d in error.get("details") or [] if isinstance(d, dict)]
        headers = getattr(exc.response, "headers", None)
        retry_after = parse_retry_after(headers.get("retry-after") if headers else None)
        if retry_after is None:
            retry_after = _retry_info_delay(details)
        kind = kind_for_status(status)
        if status == 429 and _per_day_quota(details):
            kind = ProviderErrorKind.QUOTA_EXHAUSTED
        elif status == 400 and _error_reason(details) == "API_KEY_INVALID":
            # Gemini answers a wrong key with 400 INVALID_ARGUMENT, not 401.
            kind = ProviderErrorKind.UNAUTHENTICATED
        message = redact(f"gemini: {status} {exc.status or ''}: {exc.message or ''}", self._secrets)
        return ProviderError(kind, message, status=status, retry_after=retry_after)


@functools.lru_cache(maxsize=256)
def _call_options(timeout_ms: int) -> types.HttpOptions:
    """Per-call HTTP options: the attempt's timeout, one attempt. Only read by the SDK."""
    return types.HttpOptions(timeout=timeout_ms, retry_options=_ONE_ATTEMPT)


def _model_path(model: str) -> str:
    """The model's resource name, as the SDK writes it for the Gemini API (`models/...`)."""
    if not model:
        raise ValueError("model is required")
    if ".." in model or "?" in model or "&" in model:
        raise ValueError("invalid model name")
    if model.startswith(("models/", "tunedModels/")):
        return model
    return f"models/{model}"


def request_body(request: ProviderRequest) -> dict[str, Any]:
    """The generateContent body, exactly as google-genai writes it for these settings."""
    return {
        "contents": [{"parts": [{"text": request.user_prompt}], "role": "user"}],
        "systemInstruction": {"parts": [{"text": request.system_instruction}], "role": "user"},
        "generationConfig": {
            "temperature": request.temperature,
            "candidateCount": 1,
            "maxOutputTokens": request.max_output_tokens,
            "responseMimeType": "application/json",
            # responseJsonSchema: full JSON Schema, unlike responseSchema, which takes the
            # OpenAPI subset.
            "responseJsonSchema": request.response_schema,
        },
    }


class _Unreadable(Exception):
    """A reply whose JSON does not have the shape of a GenerateContentResponse."""


def _get(container: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """`container[key]`, None when absent or null; raises _Unreadable for another type."""
    value = container.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _Unreadable(f"{key} is a {type(value).__name__}")
    return value


def _reply(payload: dict[str, Any], requested_model: str) -> ProviderReply:
    text = ""
    candidates = _get(payload, "candidates", list)
    feedback = _get(payload, "promptFeedback", dict)
    if candidates:
        candidate = candidates[0]
        if not isinstance(candidate, dict):
            raise _Unreadable("candidate is not an object")
        content = _get(candidate, "content", dict) or {}
        texts = []
        for part in _get(content, "parts", list) or []:
            if not isinstance(part, dict):
                raise _Unreadable("part is not an object")
            part_text = _get(part, "text", str)
            # Thought summaries are parts too; the judgment is the rest.
            if part_text and not _get(part, "thought", bool):
                texts.append(part_text)
        text = "".join(texts)
        finish = _FINISH_REASONS.get(_get(candidate, "finishReason", str), FinishReason.OTHER)
    elif feedback is not None and _get(feedback, "blockReason", str):
        finish = FinishReason.SAFETY
    else:
        finish = FinishReason.OTHER
    usage = _get(payload, "usageMetadata", dict) or {}
    input_tokens = _get(usage, "promptTokenCount", int) or 0
    # Thinking tokens are billed as output, and are all a MAX_TOKENS reply may have.
    output_tokens = (_get(usage, "candidatesTokenCount", int) or 0) + (
        _get(usage, "thoughtsTokenCount", int) or 0
    )
    return ProviderReply(
        text=text,
        finish_reason=finish,
        model_version=_get(payload, "modelVersion", str) or requested_model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def _error_body(details: Any) -> dict[str, Any]:
    """The `error` object of an error reply (the SDK keeps the whole body in `details`)."""
    if isinstance(details, dict):
        inner = details.get("error")
        return inner if isinstance(inner, dict) else details
    return {}


def _retry_info_delay(details: list[dict[str, Any]]) -> float | None:
    for detail in details:
        if detail.get("@type") == _RETRY_INFO:
            return parse_duration(detail.get("retryDelay"))
    return None


def _per_day_quota(details: list[dict[str, Any]]) -> bool:
    for detail in details:
        if detail.get("@type") != _QUOTA_FAILURE:
            continue
        for violation in detail.get("violations") or []:
            if isinstance(violation, dict) and "PerDay" in str(violation.get("quotaId", "")):
                return True
    return False


def _error_reason(details: list[dict[str, Any]]) -> str | None:
    for detail in details:
        if detail.get("@type") == _ERROR_INFO:
            return str(detail.get("reason", "")) or None
    return None
