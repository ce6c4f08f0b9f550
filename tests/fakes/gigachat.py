"""A fake GigaChat API and OAuth server on 127.0.0.1, in GigaChat's wire format."""

from __future__ import annotations

import base64
import collections
import secrets
import threading
import time
import uuid
from collections.abc import Collection
from typing import Any

from tests.fakes.http import FakeServer, RecordedRequest, Reply, approx_tokens

OAUTH_PATH = "/api/v2/oauth"
CHAT_PATH = "/api/v1/chat/completions"
MODELS_PATH = "/api/v1/models"

DEFAULT_CREDENTIALS = base64.b64encode(b"test-client-id:test-client-secret").decode()
DEFAULT_MODELS = ("GigaChat", "GigaChat-2", "GigaChat-2-Pro", "GigaChat-2-Max")
SCOPES = ("GIGACHAT_API_PERS", "GIGACHAT_API_B2B", "GIGACHAT_API_CORP")

# GigaChat's finish_reason for Gemini's names (the names Reply.json_text takes).
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "blacklist"}


class FakeGigaChat(FakeServer):
    """OAuth at `POST /api/v2/oauth`, chat at `POST /api/v1/chat/completions`, `GET /models`.

    OAuth checks `Authorization: Basic <credentials>`, a UUID `RqUID` and the form
    `scope`, and issues tokens that live `token_ttl_seconds`. The API answers 401 to an
    unknown or expired Bearer token and 404 "No such model" to a model it does not list.
    Scripted replies answer chat calls that passed those checks; OAuth has its own
    script (`script_oauth`).
    """

    def __init__(
        self,
        *,
        credentials: str = DEFAULT_CREDENTIALS,
        scopes: Collection[str] = SCOPES,
        models: Collection[str] = DEFAULT_MODELS,
        token_ttl_seconds: float = 1800.0,
        model_version: str | None = None,
        latency: float = 0.0,
    ) -> None:
        super().__init__(latency=latency)
        self.credentials = credentials
        self.scopes = tuple(scopes)
        self.models = tuple(models)
        self.token_ttl_seconds = token_ttl_seconds
        self.model_version = model_version  # None: "<requested model>:2.0.28.2"
        self.issued_tokens: list[str] = []  # every token handed out, oldest first
        self._tokens: dict[str, float] = {}  # token -> expiry, unix seconds
        self._tokens_lock = threading.Lock()
        self._oauth_script: collections.deque[Reply] = collections.deque()

    @property
    def url(self) -> str:
        """The SDK's `base_url`."""
        return f"{self.origin}/api/v1"

    @property
    def auth_url(self) -> str:
        """The SDK's `auth_url`."""
        return f"{self.origin}{OAUTH_PATH}"

    @property
    def token_requests(self) -> int:
        """How many OAuth requests arrived (accepted or not)."""
        return sum(1 for request in self.requests if request.path == OAUTH_PATH)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The chat requests, in arrival order."""
        return [request for request in self.requests if request.path == CHAT_PATH]

    def expire_tokens(self) -> None:
        """Makes the server reject every token issued so far (the clients still hold them)."""
        with self._tokens_lock:
            self._tokens.clear()

    def script_oauth(self, *replies: Reply) -> None:
        """Queues replies for the next OAuth requests, ahead of the credential checks."""
        with self._lock:
            self._oauth_script.extend(replies)

    def reset(self) -> None:
        """Also forgets tokens and the OAuth script."""
        super().reset()
        with self._lock:
            self._oauth_script.clear()
        with self._tokens_lock:
            self._tokens.clear()
        self.issued_tokens.clear()

    def route(self, request: RecordedRequest) -> Reply | None:
        """OAuth, the Bearer check, the model list and the model check."""
        if request.path == OAUTH_PATH and request.method == "POST":
            return self._oauth(request)
        if not request.path.startswith("/api/v1/"):
            return _error(404, "Not Found")
        if not self._token_valid(request.header("authorization")):
            return _error(401, "Unauthorized")
        if request.path == MODELS_PATH and request.method == "GET":
            return Reply(
                body={
                    "object": "list",
                    "data": [
                        {"id": model, "object": "model", "owned_by": "salutedevices"}
                        for model in self.models
                    ],
                }
            )
        if request.path == CHAT_PATH and request.method == "POST":
            body = request.body if isinstance(request.body, dict) else {}
            if body.get("model") not in self.models:
                return _error(404, "No such model")
            return None
        return _error(404, "Not Found")

    def render_text(self, request: RecordedRequest, text: str, finish: str) -> Reply:
        """`{"choices":[{"message":{...},"finish_reason":...}],"model":...,"usage":{...}}`."""
        prompt_tokens = _prompt_tokens(request)
        output_tokens = approx_tokens(text)
        return Reply(
            body={
                "choices": [
                    {
                        "message": {"role": "assistant", "content": text},
                        "index": 0,
                        "finish_reason": _FINISH.get(finish, finish),
                    }
                ],
                "created": int(time.time()),
                "model": self._model_version(request),
                "object": "chat.completion",
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": prompt_tokens + output_tokens,
                    "precached_prompt_tokens": 0,
                },
            }
        )

    def render_max_tokens_empty(self, request: RecordedRequest) -> Reply:
        """An empty answer with finish_reason "length"."""
        reply = self.render_text(request, "", "MAX_TOKENS")
        body = dict(reply.body)
        body["usage"] = {**body["usage"], "completion_tokens": _max_tokens(request)}
        return Reply(body=body)

    def render_error(
        self,
        request: RecordedRequest,
        status: int,
        message: str,
        details: list[dict[str, Any]] | None,
    ) -> Reply:
        """`{"status": <code>, "message": ...}`."""
        return _error(status, message)

    def _oauth(self, request: RecordedRequest) -> Reply:
        with self._lock:
            scripted = self._oauth_script.popleft() if self._oauth_script else None
        if scripted is not None:
            return scripted
        if request.header("authorization") != f"Basic {self.credentials}":
            return Reply(
                status=401, body={"code": 6, "message": "credentials doesn't match db data"}
            )
        try:
            uuid.UUID(request.header("rquid") or "")
        except ValueError:
            return Reply(status=400, body={"code": 5, "message": "RqUID is not a valid UUID"})
        form = request.body if isinstance(request.body, dict) else {}
        if form.get("scope") not in self.scopes:
            return Reply(
                status=400,
                body={"code": 7, "message": "scope from db not fully includes consumed scope"},
            )
        token = "tok-" + secrets.token_urlsafe(32)
        expires = time.time() + self.token_ttl_seconds
        with self._tokens_lock:
            self._tokens[token] = expires
            self.issued_tokens.append(token)
        return Reply(body={"access_token": token, "expires_at": int(expires * 1000)})

    def _token_valid(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme != "Bearer":
            return False
        with self._tokens_lock:
            expires = self._tokens.get(token)
        return expires is not None and expires > time.time()

    def _model_version(self, request: RecordedRequest) -> str:
        if self.model_version is not None:
            return self.model_version
        body = request.body if isinstance(request.body, dict) else {}
        return f"{body.get('model', 'GigaChat')}:2.0.28.2"


def _error(status: int, message: str) -> Reply:
    return Reply(status=status, body={"status": status, "message": message})


def _prompt_tokens(request: RecordedRequest) -> int:
    body = request.body if isinstance(request.body, dict) else {}
    messages = body.get("messages") or []
    return sum(approx_tokens(str(m.get("content", ""))) for m in messages if isinstance(m, dict))


def _max_tokens(request: RecordedRequest) -> int:
    body = request.body if isinstance(request.body, dict) else {}
    value = body.get("max_tokens")
    return value if isinstance(value, int) else 1024
