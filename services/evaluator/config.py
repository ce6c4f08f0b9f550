"""Settings of the evaluator, read once from the environment in main.py."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.evaluator.core.rescaling import RescaleMode

DEFAULT_BERTSCORE_RESCALE = RescaleMode.REFERENCES
"""Rescaling when neither the environment nor a request says: against the references' own
baseline. Measured on a judged SmolLM2 study (bench/generation_quality.py, README): raw
BERTScore F1 spread 0.394 across the trials, rescaled 0.474 (b = 0.167), so BERTScore's
share of the combined score's spread rose from 28% to 32%; with sentence references
b was 0.27 (x1.37), and larger encoders have higher baselines. Rankings without the judge
are unchanged (one affine map per study); the hash records the baseline."""

_RESCALE_WORDS = {
    # Booleans keep their old meaning: true = bert-score's packaged baseline.
    "true": RescaleMode.PACKAGED,
    "1": RescaleMode.PACKAGED,
    "yes": RescaleMode.PACKAGED,
    "on": RescaleMode.PACKAGED,
    "false": RescaleMode.NONE,
    "0": RescaleMode.NONE,
    "no": RescaleMode.NONE,
    "off": RescaleMode.NONE,
    **{mode.value: mode for mode in RescaleMode},
}


def parse_rescale(value: Any) -> RescaleMode:
    """A ``LORATUNE_BERTSCORE_RESCALE`` value as a RescaleMode.

    Raises:
        ValueError: naming the variable and the values it takes.
    """
    if isinstance(value, RescaleMode):
        return value
    if isinstance(value, bool):
        return RescaleMode.PACKAGED if value else RescaleMode.NONE
    word = str(value).strip().lower()
    if word in _RESCALE_WORDS:
        return _RESCALE_WORDS[word]
    raise ValueError(
        f"LORATUNE_BERTSCORE_RESCALE must be none, packaged or references (or true / false, "
        f"1 / 0, yes / no, meaning packaged / none); got {value!r}"
    )


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
    # How BERTScore is rescaled when a request does not say: none; packaged (bert-score's
    # baseline file, which needs a hub model name and lang; true means this); references
    # (a baseline computed from the request's own references, cached per reference set).
    bertscore_rescale: RescaleMode = DEFAULT_BERTSCORE_RESCALE
    # Bound on the memory of cached sentence embeddings (references come back every trial).
    bertscore_cache_bytes: int = Field(default=512 * 2**20, ge=0)
    # Load the BERTScore model at start-up rather than on the first generation request.
    bertscore_preload: bool = False
    # The judge gateway; empty = the judge cannot be enabled.
    judge_address: str = ""
    # Least share of the judge sample that must be judged for a combined score.
    judge_min_coverage: float = Field(default=0.6, ge=0.0, le=1.0)
    judge_timeout_seconds: float = Field(default=120.0, gt=0)

    @field_validator("bertscore_rescale", mode="before")
    @classmethod
    def _rescale_words(cls, value: Any) -> RescaleMode:
        return parse_rescale(value)
