"""A fake Gemini API (`generateContent`) on 127.0.0.1, in the Gemini wire format."""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from typing import Any

from tests.fakes.http import FakeServer, RecordedRequest, Reply, approx_tokens

# google.rpc.Code names by HTTP status, as the Gemini API writes them in `error.status`.
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):generateContent$")

PER_MINUTE_QUOTA = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
PER_DAY_QUOTA = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


def quota_error(quota_id: str, *, retry_delay: str | None = "7s") -> Reply:
    """A 429 as Gemini sends it: a QuotaFailure naming the quota, and a RetryInfo."""
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/"
                    "generate_content_free_tier_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"},
                    "quotaValue": "10",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
    ]
    if retry_delay is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
        )
    return Reply.error(
        429,
        message="You exceeded your current quota, please check your plan and billing details.",
        details=details,
    )


class FakeGemini(FakeServer):
    """`POST /{version}/models/{model}:generateContent`, keyed by `x-goog-api-key`.

    A missing key answers 403, a wrong one 400 API_KEY_INVALID (as Gemini does), an
    unknown model 404, and another API version 404.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-gemini-key",
        api_version: str = "v1beta",
        models: Collection[str] | None = None,
        model_version: str | None = None,
        latency: float = 0.0,
    ) -> None:
        super().__init__(latency=latency)
        self.api_key = api_key
        self.api_version = api_version
        self.models = models  # None: every model exists
        self.model_version = model_version  # None: echo the requested model

    def route(self, request: RecordedRequest) -> Reply | None:
        """Checks the path, version, key and model before the script answers."""
        match = _PATH.match(request.path)
        if request.method != "POST" or match is None:
            return self.render_error(request, 404, "Not Found", None)
        if match["version"] != self.api_version:
            return self.render_error(request, 404, f"Unknown API version {match['version']}", None)
        key = request.header("x-goog-api-key")
        if key is None:
            return self.render_error(
                request,
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity.",
                None,
            )
        if key != self.api_key:
            return self.render_error(
                request,
                400,
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        if self.models is not None and match["model"] not in self.models:
            return self.render_error(
                request,
                404,
                f"models/{match['model']} is not found for API version {self.api_version}, "
                "or is not supported for generateContent.",
                None,
            )
        return None

    def render_text(self, request: RecordedRequest, text: str, finish: str) -> Reply:
        """`{"candidates":[{"content":{"parts":[{"text":...}],"role":"model"},...}],...}`."""
        prompt_tokens = _prompt_tokens(request)
        output_tokens = approx_tokens(text)
        return Reply(
            body={
                "candidates": [
                    {
                        "content": {"parts": [{"text": text}], "role": "model"},
                        "finishReason": finish,
                        "index": 0,
                    }
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": output_tokens,
                    "totalTokenCount": prompt_tokens + output_tokens,
                },
                "modelVersion": self._model_version(request),
                "responseId": uuid.uuid4().hex[:22],
            }
        )

    def render_max_tokens_empty(self, request: RecordedRequest) -> Reply:
        """All output tokens went to thoughts: a candidate with no parts, MAX_TOKENS."""
        prompt_tokens = _prompt_tokens(request)
        budget = _generation_config(request).get("maxOutputTokens", 1024)
        return Reply(
            body={
                "candidates": [
                    {"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}
                ],
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "totalTokenCount": prompt_tokens + budget,
                    "thoughtsTokenCount": budget,
                },
                "modelVersion": self._model_version(request),
                "responseId": uuid.uuid4().hex[:22],
            }
        )

    def render_error(
        self,
        request: RecordedRequest,
        status: int,
        message: str,
        details: list[dict[str, Any]] | None,
    ) -> Reply:
        """`{"error":{"code":...,"message":...,"status":...,"details":[...]}}`."""
        error: dict[str, Any] = {
            "code": status,
            "message": message,
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
        if details is not None:
            error["details"] = details
        return Reply(status=status, body={"error": error})

    def _model_version(self, request: RecordedRequest) -> str:
        if self.model_version is not None:
            return self.model_version
        match = _PATH.match(request.path)
        return match["model"] if match else "unknown"


def _generation_config(request: RecordedRequest) -> dict[str, Any]:
    body = request.body if isinstance(request.body, dict) else {}
    config = body.get("generationConfig")
    return config if isinstance(config, dict) else {}


def _prompt_tokens(request: RecordedRequest) -> int:
    body = request.body if isinstance(request.body, dict) else {}
    texts: list[str] = []
    for content in [body.get("systemInstruction"), *body.get("contents", [])]:
        if isinstance(content, dict):
            texts.extend(str(part.get("text", "")) for part in content.get("parts", []))
    return sum(approx_tokens(text) for text in texts)
