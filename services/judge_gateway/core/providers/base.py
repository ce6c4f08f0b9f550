"""The provider port: what a judge model is asked, what it answers, and how it fails."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ProviderRequest:
    """One call to a judge model: instructions, the prompt, the reply schema, decoding."""

    model: str
    system_instruction: str
    user_prompt: str
    # JSON schema the reply must follow (structured output on every provider).
    response_schema: dict[str, Any]
    temperature: float = 0.0
    max_output_tokens: int = 1024
    # Seconds this one attempt may take; the provider's HTTP timeout.
    timeout: float = 30.0


class FinishReason(enum.Enum):
    """Why the model stopped, normalised across providers."""

    STOP = "STOP"
    MAX_TOKENS = "MAX_TOKENS"
    SAFETY = "SAFETY"
    OTHER = "OTHER"


@dataclass(frozen=True)
class ProviderReply:
    """What the model answered."""

    text: str  # "" when the model returned no text
    finish_reason: FinishReason
    # The exact model that answered, as the provider reports it (else the requested one).
    model_version: str
    input_tokens: int = 0
    output_tokens: int = 0


class ProviderErrorKind(enum.Enum):
    """Failure classes that decide retrying and the gRPC status."""

    RATE_LIMITED = "rate_limited"  # 429, clears with time: retried
    QUOTA_EXHAUSTED = "quota_exhausted"  # a per-day quota: not retried
    SERVER = "server"  # 5xx: retried
    TIMEOUT = "timeout"  # 408 or the attempt's timeout: retried
    TRANSPORT = "transport"  # connection refused / reset: retried
    UNAUTHENTICATED = "unauthenticated"  # 401 (after GigaChat's one re-authentication)
    PERMISSION_DENIED = "permission_denied"  # 403
    MODEL_NOT_FOUND = "model_not_found"  # the provider says the model does not exist
    BAD_REQUEST = "bad_request"  # other 4xx

    @property
    def retryable(self) -> bool:
        """Whether waiting and trying again can help."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ProviderErrorKind.RATE_LIMITED,
        ProviderErrorKind.SERVER,
        ProviderErrorKind.TIMEOUT,
        ProviderErrorKind.TRANSPORT,
    }
)


class ProviderError(Exception):
    """A failed provider call. The message never holds a key, credential or token."""

    def __init__(
        self,
        kind: ProviderErrorKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, from Retry-After, when the provider sent one

    def __repr__(self) -> str:
        return f"ProviderError({self.kind.value}, {self.message!r}, status={self.status})"


class JudgeProvider(Protocol):
    """One long-lived client of a provider API; safe to call concurrently.

    Implementations turn every failure into ProviderError and make exactly one HTTP
    attempt per call (the SDKs' own retries are off: the gateway retries in one layer),
    except GigaChat's single re-authentication on a 401.
    """

    provider_type: str  # "gemini", "gigachat" or "openai"
    api_version: str  # part of the cache key

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        """Asks the model once."""
        ...

    async def aclose(self) -> None:
        """Releases connections."""
        ...
