"""A fake OpenAI-compatible chat API (as vLLM or Ollama serve it) on 127.0.0.1."""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection
from typing import Any

from tests.fakes.http import FakeServer, RecordedRequest, Reply, approx_tokens

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

# OpenAI's finish_reason for Gemini's names (the names Reply.json_text takes).
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter"}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


class FakeOpenAI(FakeServer):
    """`POST /v1/chat/completions` and `GET /v1/models`.

    With `api_key` set, requests without `Authorization: Bearer <api_key>` get 401; with
    `models` set, other models get 404 (vLLM: "The model `x` does not exist.").
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Collection[str] | None = None,
        latency: float = 0.0,
    ) -> None:
        super().__init__(latency=latency)
        self.api_key = api_key
        self.models = models

    @property
    def url(self) -> str:
        """The `base_url` an OpenAI client takes: the origin plus `/v1`."""
        return f"{self.origin}/v1"

    def route(self, request: RecordedRequest) -> Reply | None:
        """The key and model checks, and the model list."""
        if self.api_key is not None and request.header("authorization") != f"Bearer {self.api_key}":
            return self.render_error(request, 401, "Incorrect API key provided.", None)
        if request.path == MODELS_PATH and request.method == "GET":
            return Reply(
                body={
                    "object": "list",
                    "data": [
                        {"id": model, "object": "model", "owned_by": "vllm"}
                        for model in self.models or ()
                    ],
                }
            )
        if request.path != CHAT_PATH or request.method != "POST":
            return self.render_error(request, 404, "Not Found", None)
        body = request.body if isinstance(request.body, dict) else {}
        if self.models is not None and body.get("model") not in self.models:
            return self.render_error(
                request, 404, f"The model `{body.get('model')}` does not exist.", None
            )
        return None

    def render_text(self, request: RecordedRequest, text: str, finish: str) -> Reply:
        """A `chat.completion` object with one choice."""
        body = request.body if isinstance(request.body, dict) else {}
        prompt_tokens = sum(
            approx_tokens(str(m.get("content", "")))
            for m in body.get("messages") or []
            if isinstance(m, dict)
        )
        output_tokens = approx_tokens(text)
        return Reply(
            body={
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model", "unknown")),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": _FINISH.get(finish, finish),
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": prompt_tokens + output_tokens,
                },
            }
        )

    def render_max_tokens_empty(self, request: RecordedRequest) -> Reply:
        """No content at all (`null`), finish_reason "length"."""
        reply = self.render_text(request, "", "MAX_TOKENS")
        body = dict(reply.body)
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None},
                "finish_reason": "length",
            }
        ]
        return Reply(body=body)

    def render_error(
        self,
        request: RecordedRequest,
        status: int,
        message: str,
        details: list[dict[str, Any]] | None,
    ) -> Reply:
        """`{"error":{"message":...,"type":...,"param":null,"code":...}}`."""
        return Reply(
            status=status,
            body={
                "error": {
                    "message": message,
                    "type": _ERROR_TYPES.get(status, "server_error"),
                    "param": None,
                    "code": status,
                }
            },
        )
