"""Training defaults under the names users already know (LORA_*, FOCAL_LOSS_GAMMA, ...)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainingDefaults(BaseSettings):
    """Defaults the CLI, the trainer and the optimizer apply to fields a request leaves unset."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    lora_model_name: str = "Qwen/Qwen3-0.6B"
    lora_n_trials: int = Field(default=20, ge=1)
    lora_num_epochs: int = Field(default=3, ge=1)
    lora_batch_size: int = Field(default=4, ge=1)
    lora_learning_rate: float = Field(default=1e-4, gt=0)
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    focal_loss_gamma: float = Field(default=2.0, ge=0)
    use_class_weights: bool = True
    use_weighted_sampler: bool = False
    min_samples_per_class: int = Field(default=0, ge=0)
    gradient_accumulation: int = Field(default=1, ge=1)
    max_seq_length: int = Field(default=512, ge=8)
