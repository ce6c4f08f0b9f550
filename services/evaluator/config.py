"""Settings of the evaluator, read once from the environment in main.py."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class EvaluatorSettings(BaseSettings):
    """`LORATUNE_*` variables the evaluator reads (the server's own are in CommonSettings)."""

    model_config = SettingsConfigDict(env_prefix="LORATUNE_", extra="ignore")

    # Hub name or local folder of the BERTScore model; empty = bert-score's own default
    # for English (roberta-large, layer 17).
    bertscore_model: str = ""
    # Layer whose embeddings are used; required for a local folder.
    bertscore_layers: int | None = Field(default=None, ge=1)
    bertscore_batch_size: int = Field(default=64, ge=1)
    # "cpu", "cuda", "cuda:1"; empty = cuda when available.
    bertscore_device: str = ""
    bertscore_lang: str = "en"
    bertscore_idf: bool = False
    bertscore_rescale: bool = False
    # Bound on the memory of cached sentence embeddings (references come back every trial).
    bertscore_cache_bytes: int = Field(default=512 * 2**20, ge=0)
    # Load the BERTScore model at start-up rather than on the first generation request.
    bertscore_preload: bool = False
    # The judge gateway; empty = the judge cannot be enabled.
    judge_address: str = ""
    # Least share of the judge sample that must be judged for a combined score.
    judge_min_coverage: float = Field(default=0.6, ge=0.0, le=1.0)
    judge_timeout_seconds: float = Field(default=120.0, gt=0)
