"""Settings of the optimizer, read once from the environment in main.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OptimizerSettings(BaseSettings):
    """`LORATUNE_*` variables the optimizer reads (see the README's configuration table)."""

    model_config = SettingsConfigDict(env_prefix="LORATUNE_", extra="ignore")

    # Comma-separated trainer addresses; empty = Kubernetes discovery (k8s_namespace).
    trainers: str = ""
    # The trainers may all be gone for a while (scaled to zero, started on demand): a study
    # created with none ready waits for one instead of being refused. Always so with
    # Kubernetes discovery.
    trainers_scale_from_zero: bool = False
    evaluator_address: str = ""
    judge_address: str = ""
    # Optuna storage; empty = sqlite:///<artifact_root>/optuna.db.
    storage_url: str = ""
    artifact_root: Path = Path("./runs")
    # Kubernetes discovery: ready pods matching the selector in the namespace.
    k8s_namespace: str = ""
    k8s_label_selector: str = "app.kubernetes.io/component=trainer"
    k8s_trainer_port: int = Field(default=50052, ge=1, le=65535)
    # Failed trials (NaN, out of memory, internal errors) before a study ends FAILED.
    max_trial_failures: int = Field(default=10, ge=1)
    # Runs of one configuration whose job failed with an internal error.
    max_trial_attempts: int = Field(default=3, ge=1)
    # Re-runs of one trial interrupted through no fault of its own (its trainer stopped or
    # vanished, the optimizer restarted) before it counts as failed.
    max_trial_interruptions: int = Field(default=10, ge=1)
    # How long an evaluation is retried while the evaluator is unavailable.
    evaluation_retry_seconds: float = Field(default=300.0, gt=0)
    # How often idle trainers are looked for while a study waits for one.
    poll_seconds: float = Field(default=1.0, gt=0)
    # YAML file of the team's projects (core/project_file.py); empty = none. Read again
    # when it changes (a ConfigMap update too); a bad version keeps the last good one.
    projects: str = ""

    def storage(self) -> str:
        """The Optuna storage URL."""
        return self.storage_url or f"sqlite:///{(self.artifact_root / 'optuna.db').resolve()}"

    def trainer_addresses(self) -> list[str]:
        """The static trainer list, or [] for Kubernetes discovery."""
        return [a.strip() for a in self.trainers.split(",") if a.strip()]

    def projects_file(self) -> Path | None:
        """The projects file, or None when no projects are configured."""
        return Path(self.projects.strip()) if self.projects.strip() else None
