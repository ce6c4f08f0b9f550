"""Settings of the console, read once from the environment by its composition root."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.console.context import (
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SESSION_SECONDS,
)

__all__ = ["ConsoleSettings"]


class ConsoleSettings(BaseSettings):
    """`LORATUNE_*` variables the console reads; the addresses are the names the CLI, the
    optimizer and the evaluator use (LORATUNE_OPTIMIZER_ADDRESS, LORATUNE_JUDGE_ADDRESS).

    The token (LORATUNE_AUTH_TOKEN) and TLS come from the common settings and the client's.
    """

    model_config = SettingsConfigDict(
        env_prefix="LORATUNE_", extra="ignore", env_ignore_empty=True, frozen=True
    )

    optimizer_address: str = ""
    # The judge gateway, for /api/v1/judge-models; empty = that endpoint answers 503.
    judge_address: str = ""
    host: str = "0.0.0.0"
    # Largest request body of the JSON API (413 beyond).
    console_max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    # Time requests in flight get when the console stops (open event streams end at once).
    grace_period_seconds: float = Field(default=10.0, ge=0)
    # Longest silence of an event stream before a heartbeat comment.
    console_heartbeat_seconds: float = Field(default=DEFAULT_HEARTBEAT_SECONDS, gt=0)
    # How long a browser's sign-in lasts (LORATUNE_CONSOLE_SESSION_SECONDS); signing out
    # ends it at once.
    console_session_seconds: int = Field(default=DEFAULT_SESSION_SECONDS, gt=0, le=30 * 86400)
