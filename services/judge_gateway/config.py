"""Settings of the judge gateway, read once from the environment in main.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class JudgeSettings(BaseSettings):
    """`LORATUNE_JUDGE_*` variables (the providers' own variables are read by the registry)."""

    model_config = SettingsConfigDict(env_prefix="LORATUNE_JUDGE_", extra="ignore")

    # YAML or JSON file with more judge models (see README).
    models: Path | None = None
    # Registry id used when a request names none; empty = the file's default, else gemini.
    default: str = ""
    # SQLite file that keeps judgments across restarts; empty = memory only.
    cache_path: Path | None = None
    cache_entries: int = Field(default=100_000, ge=0)
    # Provider calls in flight at once, over every provider.
    max_concurrency: int = Field(default=16, ge=1)
    # Attempts per item and the total time they may take.
    max_attempts: int = Field(default=6, ge=1)
    retry_budget_seconds: float = Field(default=60.0, gt=0)
    retry_base_delay_seconds: float = Field(default=0.5, gt=0)
    # Timeout of one provider call.
    attempt_timeout_seconds: float = Field(default=30.0, gt=0)
    # Consecutive provider failures that open its circuit, and how long it stays open.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
