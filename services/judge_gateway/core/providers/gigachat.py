"""GigaChat as a judge, through the gigachat SDK's async client: OAuth tokens, one attempt."""

from __future__ import annotations

import asyncio
import contextvars
import json
import ssl

import httpx
from gigachat import (
    Chat,
    ChatCompletion,
    GigaChatAsyncClient,
    GigaChatException,
    Messages,
    MessagesRole,
    ModelNotSpecifiedError,
    ResponseError,
)
from gigachat.models.response_format import JsonSchemaResponseFormat

from services.judge_gateway.core.providers._common import (
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

DEFAULT_SCOPE = "GIGACHAT_API_PERS"
DEFAULT_BASE_URL = "https://gigachat.devices.sberbank.ru/api/v1"
DEFAULT_AUTH_URL = "https://ngw.devices.sberbank.ru:9443/api/v2/oauth"

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.MAX_TOKENS,
    "blacklist": FinishReason.SAFETY,
}

# A ceiling for the SDK's httpx clients; each call is bounded by its own, shorter deadline.
_CLIENT_TIMEOUT_S = 600.0

# The access token the current call sent on its first attempt (see _Client._reset_token).
_sent_token: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gigachat_sent_token", default=None
)


class _Client(GigaChatAsyncClient):
    """The SDK's async client, whose token reset spares a token refreshed meanwhile.

    On a 401 the SDK resets the token, re-authenticates under its lock and repeats the
    call once. Fetching is single-flight (the lock re-checks the token), but the reset
    is not: when concurrent calls all sent a token the server no longer accepts, a 401
    that arrives after another call has already fetched a new token would discard that
    new token and cost one more OAuth request per straggler.
    """

    def _reset_token(self) -> None:
        sent = _sent_token.get()
        if sent is not None and self.token != sent:
            return  # already replaced since this call sent it: keep the new one
        super()._reset_token()


class GigaChatProvider:
    """A GigaChat model as judge: JSON-schema output, one attempt per `generate`.

    The one exception to "one attempt" is the SDK's own: a 401 on the chat call resets
    the token, re-authenticates once and repeats the call once.
    """

    provider_type = "gigachat"

    def __init__(
        self,
        credentials: str,
        *,
        scope: str = DEFAULT_SCOPE,
        base_url: str,
        auth_url: str,
        verify_ssl_certs: bool = True,
        ca_bundle_file: str | None = None,
    ) -> None:
        if not credentials.strip():
            raise ValueError("GigaChatProvider needs non-empty credentials")
        self.api_version = api_version_from_url(base_url, "v1")
        self._base_url = base_url
        self._auth_url = auth_url
        self._scope = scope
        self._credentials = credentials
        ssl_context = None
        if verify_ssl_certs and ca_bundle_file:
            # Built here rather than passed as ca_bundle_file: the SDK would hand httpx
            # the path as `verify=<str>`, which httpx 0.28 deprecates.
            ssl_context = ssl.create_default_context(cafile=ca_bundle_file)
        self._client = _Client(
            credentials=credentials,
            scope=scope,
            base_url=base_url,
            auth_url=auth_url,
            verify_ssl_certs=verify_ssl_certs,
            ssl_context=ssl_context,
            timeout=_CLIENT_TIMEOUT_S,
            max_retries=0,
        )

    def __repr__(self) -> str:
        return (
            f"GigaChatProvider(base_url={self._base_url!r}, auth_url={self._auth_url!r}, "
            f"scope={self._scope!r})"
        )

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        """Asks the model once (plus the SDK's one repeat after a 401)."""
        chat = Chat(
            model=request.model,
            messages=[
                Messages(role=MessagesRole.SYSTEM, content=request.system_instruction),
                Messages(role=MessagesRole.USER, content=request.user_prompt),
            ],
            temperature=request.temperature,
            max_tokens=request.max_output_tokens,
            response_format=JsonSchemaResponseFormat(schema=request.response_schema, strict=True),
        )
        # The SDK reads the token for the first attempt without yielding to the event loop
        # after this point, so this is the token that a 401 will be about.
        marker = _sent_token.set(self._client.token)
        try:
            async with asyncio.timeout(request.timeout):
                completion = await self._client.achat(chat)
        except ResponseError as exc:
            raise self._response_error(exc) from None
        except TRANSPORT_ERRORS as exc:
            raise transport_error("gigachat", exc, self._secrets()) from None
        except ModelNotSpecifiedError:
            raise ProviderError(ProviderErrorKind.BAD_REQUEST, "gigachat: no model given") from None
        except (ValueError, GigaChatException) as exc:
            # A 200 whose body is not JSON, or not the shape the SDK expects.
            raise ProviderError(
                ProviderErrorKind.SERVER,
                f"gigachat: unreadable response ({type(exc).__name__})",
                status=200,
            ) from None
        finally:
            _sent_token.reset(marker)
        return _reply(completion, request.model)

    async def aclose(self) -> None:
        """Closes the SDK's HTTP clients (API and OAuth)."""
        await self._client.aclose()

    def _secrets(self) -> tuple[str | None, ...]:
        return (self._credentials, self._client.token, _sent_token.get())

    def _response_error(self, exc: ResponseError) -> ProviderError:
        # The SDK picks its exception class by status alone (AuthenticationError is 401,
        # NotFoundError 404, ...), so the status says everything the class would.
        status = int(exc.status_code)
        kind = kind_for_status(status)
        at_oauth = _same_endpoint(exc.url, self._auth_url)
        if at_oauth and kind is ProviderErrorKind.MODEL_NOT_FOUND:
            kind = ProviderErrorKind.BAD_REQUEST  # a wrong auth_url, not a missing model
        retry_after = None
        if status == 429:
            # Parsed here: the SDK's RateLimitError.retry_after reads delta-seconds only
            # and says 0.0 when the header is absent.
            headers = exc.headers if isinstance(exc.headers, httpx.Headers) else None
            retry_after = parse_retry_after(headers.get("retry-after") if headers else None)
        message = redact(
            f"gigachat {'oauth' if at_oauth else 'chat'}: {status}: {_error_message(exc.content)}",
            self._secrets(),
        )
        return ProviderError(kind, message, status=status, retry_after=retry_after)


def _reply(completion: ChatCompletion, requested_model: str) -> ProviderReply:
    text = ""
    finish = FinishReason.OTHER
    if completion.choices:
        choice = completion.choices[0]
        text = choice.message.content or ""
        finish = _FINISH_REASONS.get(choice.finish_reason or "", FinishReason.OTHER)
    return ProviderReply(
        text=text,
        finish_reason=finish,
        model_version=completion.model or requested_model,
        input_tokens=completion.usage.prompt_tokens,
        output_tokens=completion.usage.completion_tokens,
    )


def _error_message(content: bytes | None) -> str:
    """The `message` of a GigaChat error body, else the start of the body."""
    if not content:
        return ""
    try:
        body = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace")
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return content[:200].decode("utf-8", "replace")


def _same_endpoint(url: httpx.URL | str, other: str) -> bool:
    try:
        return httpx.URL(str(url)).copy_with(query=None) == httpx.URL(other).copy_with(query=None)
    except httpx.InvalidURL:
        return False
