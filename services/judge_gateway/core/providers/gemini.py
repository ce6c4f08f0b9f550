"""The Gemini API as a judge, through google-genai: one attempt per call over our httpx client."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
from google import genai
from google.genai import errors, types

from services.judge_gateway.core.providers._common import (
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
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(_CLIENT_TIMEOUT_S))
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

    def __repr__(self) -> str:
        return f"GeminiProvider(base_url={self._base_url!r}, api_version={self.api_version!r})"

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        """Asks the model once; every failure becomes a ProviderError."""
        config = types.GenerateContentConfig(
            system_instruction=request.system_instruction,
            temperature=request.temperature,
            max_output_tokens=request.max_output_tokens,
            candidate_count=1,
            response_mime_type="application/json",
            # Sent as generationConfig.responseJsonSchema: full JSON Schema, unlike
            # response_schema (responseSchema), which takes the OpenAPI subset.
            response_json_schema=request.response_schema,
            # Both would make the SDK send follow-up requests on its own.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
            http_options=types.HttpOptions(
                timeout=max(1, math.ceil(request.timeout * 1000)),
                retry_options=_ONE_ATTEMPT,
            ),
        )
        contents = [types.Content(role="user", parts=[types.Part(text=request.user_prompt)])]
        try:
            # httpx's timeout bounds each read; this bounds the whole attempt.
            async with asyncio.timeout(request.timeout):
                response = await self._client.aio.models.generate_content(
                    model=request.model, contents=contents, config=config
                )
        except errors.APIError as exc:
            raise self._api_error(exc) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_error("gemini", exc, self._secrets) from None
        except ValueError as exc:
            # A 200 whose body is not the JSON it claims to be: the server's fault.
            raise ProviderError(
                ProviderErrorKind.SERVER,
                f"gemini: unreadable response body ({type(exc).__name__})",
                status=200,
            ) from None
        return _reply(response, request.model)

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


def _reply(response: types.GenerateContentResponse, requested_model: str) -> ProviderReply:
    text = ""
    if response.candidates:
        candidate = response.candidates[0]
        parts = candidate.content.parts if candidate.content and candidate.content.parts else []
        # Thought summaries are parts too; the judgment is the rest.
        text = "".join(part.text for part in parts if part.text and not part.thought)
        finish = _finish_reason(candidate.finish_reason)
    elif response.prompt_feedback is not None and response.prompt_feedback.block_reason:
        finish = FinishReason.SAFETY
    else:
        finish = FinishReason.OTHER
    usage = response.usage_metadata
    input_tokens = output_tokens = 0
    if usage is not None:
        input_tokens = usage.prompt_token_count or 0
        # Thinking tokens are billed as output, and are all a MAX_TOKENS reply may have.
        output_tokens = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    return ProviderReply(
        text=text,
        finish_reason=finish,
        model_version=response.model_version or requested_model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def _finish_reason(reason: object) -> FinishReason:
    if reason is None:
        return FinishReason.OTHER
    name = str(getattr(reason, "value", reason))
    return _FINISH_REASONS.get(name, FinishReason.OTHER)


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
