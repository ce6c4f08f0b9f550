"""Checks of a job's parameters that need neither the data nor the model."""

from __future__ import annotations

import math
import unicodedata

from services.common.errors import InvalidArgument
from services.trainer.core.types import JobSpec, Task

_LORA = "hyperparameters.lora"
_TRAINING = "hyperparameters.training"
_BALANCING = "hyperparameters.balancing"
# A label hierarchy's separator ("." of accounting codes, "_" of banking77's intents).
_MAX_SEPARATOR_LENGTH = 4


def _finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number (got {value})", field=field)


def validate_parameters(spec: JobSpec) -> None:
    """Raises InvalidArgument naming the first field that is out of range."""
    if not spec.base_model.strip():
        raise InvalidArgument(
            "must name a local folder or a Hugging Face hub model", field="base_model"
        )
    if not spec.dataset.uri.strip():
        raise InvalidArgument("must name the training file", field="dataset.uri")
    lora, training, balancing = spec.lora, spec.training, spec.balancing
    if lora.rank < 1:
        raise InvalidArgument(f"must be >= 1 (got {lora.rank})", field=f"{_LORA}.rank")
    _finite(lora.alpha, f"{_LORA}.alpha")
    if lora.alpha <= 0:
        raise InvalidArgument(f"must be > 0 (got {lora.alpha:g})", field=f"{_LORA}.alpha")
    _finite(lora.dropout, f"{_LORA}.dropout")
    if not 0 <= lora.dropout < 1:
        raise InvalidArgument(f"must be in [0, 1) (got {lora.dropout:g})", field=f"{_LORA}.dropout")
    _finite(training.learning_rate, f"{_TRAINING}.learning_rate")
    if training.learning_rate <= 0:
        raise InvalidArgument(
            f"must be > 0 (got {training.learning_rate:g})", field=f"{_TRAINING}.learning_rate"
        )
    if training.probe_only and spec.dataset.task is not Task.CLASSIFICATION:
        raise InvalidArgument(
            "the linear probe fits a classification head; generation has none",
            field=f"{_TRAINING}.probe_only",
        )
    for name, value in (
        ("num_epochs", 1 if training.probe_only else training.num_epochs),
        ("batch_size", training.batch_size),
        ("gradient_accumulation", training.gradient_accumulation),
    ):
        if value < 1:
            raise InvalidArgument(f"must be >= 1 (got {value})", field=f"{_TRAINING}.{name}")
    if training.max_seq_length < 8:
        raise InvalidArgument(
            f"must be >= 8 tokens (got {training.max_seq_length})",
            field=f"{_TRAINING}.max_seq_length",
        )
    _finite(training.warmup_ratio, f"{_TRAINING}.warmup_ratio")
    if not 0 <= training.warmup_ratio < 1:
        raise InvalidArgument(
            f"must be in [0, 1) (got {training.warmup_ratio:g})", field=f"{_TRAINING}.warmup_ratio"
        )
    _finite(training.weight_decay, f"{_TRAINING}.weight_decay")
    if training.weight_decay < 0:
        raise InvalidArgument(
            f"must be >= 0 (got {training.weight_decay:g})", field=f"{_TRAINING}.weight_decay"
        )
    _finite(balancing.logit_adjust_tau, f"{_BALANCING}.logit_adjust_tau")
    if not 0 <= balancing.logit_adjust_tau <= 5:
        raise InvalidArgument(
            f"must be in [0, 5] (got {balancing.logit_adjust_tau:g})",
            field=f"{_BALANCING}.logit_adjust_tau",
        )
    _finite(balancing.sampler_power, f"{_BALANCING}.sampler_power")
    if not 0 <= balancing.sampler_power <= 1:
        raise InvalidArgument(
            f"must be in [0, 1] (got {balancing.sampler_power:g})",
            field=f"{_BALANCING}.sampler_power",
        )
    _finite(balancing.focal_gamma, f"{_BALANCING}.focal_gamma")
    if balancing.focal_gamma < 0:
        raise InvalidArgument(
            f"must be >= 0 (got {balancing.focal_gamma:g})", field=f"{_BALANCING}.focal_gamma"
        )
    separator = balancing.group_separator
    if len(separator) > _MAX_SEPARATOR_LENGTH:
        raise InvalidArgument(
            f"must be at most {_MAX_SEPARATOR_LENGTH} characters (got {len(separator)})",
            field=f"{_BALANCING}.group_separator",
        )
    # Control and invisible format characters (a tab, a zero-width space) cannot be told
    # apart in a log line or a label.
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in separator):
        raise InvalidArgument(
            "must not hold control characters", field=f"{_BALANCING}.group_separator"
        )
    fraction = spec.dataset.validation_fraction
    if not spec.dataset.validation_uri and not 0 < fraction < 1:
        raise InvalidArgument(
            f"must be in (0, 1) (got {fraction:g})", field="dataset.validation_fraction"
        )
