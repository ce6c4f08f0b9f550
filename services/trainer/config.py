"""Settings of the trainer, read once from the environment in main.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerSettings(BaseSettings):
    """`LORATUNE_*` variables the trainer reads."""

    model_config = SettingsConfigDict(env_prefix="LORATUNE_", extra="ignore")

    # Where job folders go when a request names no output_dir.
    artifact_root: Path = Path("./runs")
    # Progress events every this many optimizer steps.
    trainer_progress_every_steps: int = Field(default=5, ge=1)
    # Tokenised datasets kept for later jobs.
    trainer_tokenization_cache_entries: int = Field(default=8, ge=0)
    # Finished jobs whose events stay available to WatchTraining.
    trainer_jobs_kept: int = Field(default=64, ge=1)
    # Fit a fresh encoder classifier's head by a linear probe before the first step (LP-FT).
    trainer_linear_probe: bool = True
    # bfloat16 autocast on the CPU: auto = where the CPU has it natively (AVX512-BF16 or AMX).
    trainer_cpu_bf16: Literal["auto", "true", "false"] = "auto"
    # Share of a classification job's steps that train the head alone before the adapter joins.
    trainer_head_only_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
