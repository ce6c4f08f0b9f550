"""Settings every loratune server shares, read once from ``LORATUNE_*`` variables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CommonSettings"]


class CommonSettings(BaseSettings):
    """Server settings shared by every service: logging, reflection, auth, TLS, limits.

    Each field ``x`` comes from ``LORATUNE_X``; unknown variables are ignored and empty
    ones count as unset. Construct it once, in ``main.py``, and pass it down.
    """

    model_config = SettingsConfigDict(
        env_prefix="LORATUNE_",
        extra="ignore",
        env_ignore_empty=True,
        frozen=True,
        # A validation error must not print the raw input: it holds the auth token.
        hide_input_in_errors=True,
    )

    log_format: Literal["plain", "json"] = "plain"
    log_level: str = "INFO"
    reflection: bool = True
    auth_token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    grace_period_seconds: float = Field(default=10.0, ge=0)
    # Time between health turning NOT_SERVING and the server refusing new calls, so that
    # health watchers and load balancers move away first. Part of the grace period.
    shutdown_drain_seconds: float = Field(default=0.0, ge=0)
    max_message_bytes: int = Field(default=64 * 2**20, gt=0)
    host: str = "0.0.0.0"
    # torch's intra-op threads in the trainer and the evaluator; 0 = from OMP_NUM_THREADS
    # when set, else the CPUs the process may use (affinity capped by the cgroup quota).
    torch_threads: int = Field(default=0, ge=0)

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_log_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {value!r}; use DEBUG, INFO, WARNING or ERROR")
        return level

    @model_validator(mode="after")
    def _tls_files_together(self) -> CommonSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                "LORATUNE_TLS_CERT and LORATUNE_TLS_KEY must be set together "
                f"(LORATUNE_TLS_CERT={'set' if self.tls_cert else 'unset'}, "
                f"LORATUNE_TLS_KEY={'set' if self.tls_key else 'unset'})"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "LORATUNE_TLS_CLIENT_CA (mutual TLS) needs LORATUNE_TLS_CERT and LORATUNE_TLS_KEY"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        """Whether the server listens with TLS."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def mtls_enabled(self) -> bool:
        """Whether the server requires client certificates signed by ``tls_client_ca``."""
        return self.tls_enabled and self.tls_client_ca is not None
