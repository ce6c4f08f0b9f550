"""An OpenAI-compatible chat API (a local vLLM or Ollama) as a judge, over plain httpx."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from services.judge_gateway.core.providers._common import (
    POOL_LIMITS,
    TRANSPORT_ERRORS,
    api_version_from_url,
    kind_for_status,
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

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.MAX_TOKENS,
    "content_filter": FinishReason.SAFETY,
}

# A ceiling for the client; each call sets its own, shorter timeout.
_CLIENT_TIMEOUT_S = 600.0

# The name OpenAI's json_schema response format requires; it means nothing else.
SCHEMA_NAME = "judgment"


class OpenAICompatibleProvider:
    """`POST {base_url}/chat/completions` with a strict JSON-schema response format.

    `base_url` includes the version, as OpenAI clients take it: `http://host:8000/v1`.
    """

    provider_type = "openai"

    def __init__(self, base_url: str, *, api_key: str | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self.api_version = api_version_from_url(self._base_url, "v1")
        self._api_key = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self._base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(_CLIENT_TIMEOUT_S),
            limits=POOL_LIMITS,
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleProvider(base_url={self._base_url!r})"

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        """Asks the model once; every failure becomes a ProviderError."""
        body = {
            "model": request.model,
            "messages": [
                {"role": "system", "content": request.system_instruction},
                {"role": "user", "content": request.user_prompt},
            ],
            "temperature": request.temperature,
            "max_tokens": request.max_output_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": SCHEMA_NAME,
                    "schema": request.response_schema,
                    "strict": True,
                },
            },
        }
        try:
            # httpx's timeout bounds each read; this bounds the whole attempt.
            async with asyncio.timeout(request.timeout):
                response = await self._http.post(
                    "chat/completions", json=body, timeout=request.timeout
                )
        except TRANSPORT_ERRORS as exc:
            raise transport_error("openai", exc, (self._api_key,)) from None
        if response.status_code != 200:
            raise self._status_error(response)
        try:
            payload = response.json()
        except ValueError:
            raise ProviderError(
                ProviderErrorKind.SERVER, "openai: response body is not JSON", status=200
            ) from None
        if not isinstance(payload, dict):
            raise ProviderError(
                ProviderErrorKind.SERVER, "openai: response body is not an object", status=200
            )
        return _reply(payload, request.model)

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    def _status_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        message = redact(f"openai: {status}: {_error_message(response)}", (self._api_key,))
        return ProviderError(
            kind_for_status(status), message, status=status, retry_after=retry_after
        )


def _reply(payload: dict[str, Any], requested_model: str) -> ProviderReply:
    text = ""
    finish = FinishReason.OTHER
    choices = payload.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        text = content if isinstance(content, str) else ""
        finish = _FINISH_REASONS.get(str(choice.get("finish_reason")), FinishReason.OTHER)
    raw_usage = payload.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    model = payload.get("model")
    return ProviderReply(
        text=text,
        finish_reason=finish,
        model_version=model if isinstance(model, str) and model else requested_model,
        input_tokens=_count(usage.get("prompt_tokens")),
        output_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI (`{"error":{"message"}}`) or vLLM (`{"message"}`) error."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return response.text[:200]
