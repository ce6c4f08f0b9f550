"""Domain types of the trainer, shared by data loading, models, the loop and the job manager."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final


class Task(enum.Enum):
    """What the adapter learns."""

    CLASSIFICATION = "classification"
    GENERATION = "generation"


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and which fields to read (defaults already applied)."""

    uri: str
    task: Task
    format: str = ""  # "jsonl" | "csv" | "" = by extension
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    target_field: str = "response"
    validation_uri: str = ""
    validation_fraction: float = 0.1
    seed: int = 42


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()  # empty = every linear layer
    use_rslora: bool = False
    use_dora: bool = False


@dataclass(frozen=True)
class TrainingSpec:
    """The training loop's settings."""

    learning_rate: float = 1e-4
    num_epochs: int = 3
    batch_size: int = 4
    gradient_accumulation: int = 1
    max_seq_length: int = 512
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    quantize_4bit: bool = False
    seed: int = 42
    probe_only: bool = False  # classification: the linear probe alone, no fine-tuning step


@dataclass(frozen=True)
class BalancingSpec:
    """Class balancing (classification only)."""

    focal_gamma: float = 2.0  # 0 = plain cross-entropy
    use_class_weights: bool = True
    use_weighted_sampler: bool = False
    min_samples_per_class: int = 0
    posthoc_logit_adjustment: bool = False  # choose tau on validation, fold it into the head
    logit_adjust_tau: float = 0.0  # logit-adjusted loss; 0 = off
    sampler_power: float = 0.0  # with the sampler: class drawn with p ~ count ** power
    two_stage: bool = False  # re-fit the head, class-balanced, on the fine-tuned features
    # Hierarchical codes: group = the label's part before this separator; "" = off
    # (core/hierarchy.py: a group head trained beside the code head, combined to predict).
    group_separator: str = ""


@dataclass(frozen=True)
class JobSpec:
    """Everything one training job needs."""

    job_id: str
    base_model: str
    dataset: DatasetSpec
    lora: LoraSpec
    training: TrainingSpec
    balancing: BalancingSpec
    output_dir: str
    max_eval_samples: int = 0  # 0 = all (classification) or 64 (generation)
    max_new_tokens: int = 128


class BaseModelFormat(enum.Enum):
    """How a base model is stored (the proto's BaseModelFormat)."""

    TRANSFORMERS = "transformers"  # a hub name, or a folder with config.json
    GGUF = "gguf"  # a llama.cpp file, de-quantised when loaded (core/gguf.py)


@dataclass(frozen=True)
class BaseModelInfo:
    """What a base model was loaded from and how: GetTrainerStatus and training_config.json.

    `name` is what identifies the loaded weights: the request's `base_model` for a
    transformers model, the GGUF file's absolute path for a GGUF one (whether the request
    named the file or its folder), so one file is one cached base.
    """

    name: str
    format: BaseModelFormat = BaseModelFormat.TRANSFORMERS
    gguf_file: str = ""  # GGUF: the file's name
    gguf_folder: str = ""  # GGUF: the absolute folder holding it
    gguf_quantization_type: str = ""  # GGUF: as the file records it ("Q4_1"; "" = unsaid)
    dequantized: bool = False  # the stored weights were unpacked to dense floats (GGUF)
    quantize_4bit: bool = False  # then quantised to NF4 by bitsandbytes (QLoRA)
    dtype: str = ""  # the dense weights' dtype as loaded: "float32", "bfloat16"

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready form (training_config.json's `base_model_source`)."""
        return {
            "name": self.name,
            "format": self.format.value,
            "gguf_file": self.gguf_file,
            "gguf_folder": self.gguf_folder,
            "gguf_quantization_type": self.gguf_quantization_type,
            "dequantized": self.dequantized,
            "quantize_4bit": self.quantize_4bit,
            "dtype": self.dtype,
        }


@dataclass(frozen=True)
class LoopOptions:
    """How the training loop treats a classification head: a deployment's choice
    (`TrainerSettings`, or a benchmark's flags), the same for every job it runs.

    The defaults are what the trainer ships with (the probe and the head's learning rate
    were chosen on bench/banking77_longtail.py, whose flags override each of them).

    Raises:
        ValueError: a value out of its range.
    """

    # Fit a fresh encoder head's final linear layer on the frozen features before the first
    # step (probe.linear_probe_head): fine-tuning then starts from a logistic regression's
    # solution (LP-FT: Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features").
    linear_probe: bool = True
    # Share of a classification run's optimizer steps that train the head alone before the
    # adapter joins (a random head's first gradients push the adapter in arbitrary
    # directions). Those steps need no backward pass through the backbone. In [0, 1).
    head_only_fraction: float = 0.0
    # A head that starts from random weights (a decoder's `score`, or any head without the
    # probe) must learn the whole mapping while the LoRA matrices only nudge pretrained
    # layers: at the adapter's learning rate the head is the bottleneck. It trains at this
    # multiple of the adapter's rate, and at least at `head_min_learning_rate`. A probed
    # head trains at the adapter's rate.
    head_lr_multiplier: float = 10.0
    head_min_learning_rate: float = 5e-3
    # bfloat16 autocast on the CPU: None = where the CPU has it natively (AVX512-BF16 or
    # AMX), True / False = always / never. Weights, gradients and the optimizer stay
    # float32; the matrix products run in bfloat16 (models.autocast_dtype).
    cpu_bf16: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.head_only_fraction < 1.0:  # NaN fails too
            raise ValueError(
                f"head_only_fraction must lie in [0, 1), not {self.head_only_fraction}"
            )
        if not (math.isfinite(self.head_lr_multiplier) and self.head_lr_multiplier > 0):
            raise ValueError(f"head_lr_multiplier must be positive, not {self.head_lr_multiplier}")
        if not (math.isfinite(self.head_min_learning_rate) and self.head_min_learning_rate >= 0):
            raise ValueError(
                f"head_min_learning_rate must not be negative, not {self.head_min_learning_rate}"
            )


# The options every job gets unless the deployment says otherwise (frozen: nothing can flip
# them for everyone at run time).
DEFAULT_LOOP_OPTIONS: Final = LoopOptions()


# ---- what data preparation hands to the model layer -------------------------------------


@dataclass(frozen=True)
class ClassStats:
    """Per-label counts of the training split, and what balancing makes of them."""

    counts: Mapping[str, int]  # training rows per kept label
    excluded: Mapping[str, int]  # labels under min_samples_per_class, with their counts
    weights: Mapping[str, float]  # n_samples / (n_classes * n_samples_i)
    # Validation rows per label not trained on (excluded, or absent from training): they
    # stay in validation and count as misses.
    untrained_validation: Mapping[str, int] = field(default_factory=dict)

    @property
    def imbalance_ratio(self) -> float:
        """Rows of the largest class over rows of the smallest."""
        values = list(self.counts.values())
        return max(values) / min(values) if values else 0.0


@dataclass(frozen=True)
class Example:
    """One raw row. Classification: `text` and `label`. Generation: `prompt` and `target`."""

    text: str = ""
    label: str = ""
    prompt: str = ""
    target: str = ""


@dataclass(frozen=True)
class PreparedData:
    """The split, label map and statistics, before tokenisation."""

    task: Task
    train: Sequence[Example]
    validation: Sequence[Example]
    labels: tuple[str, ...]  # classification: sorted kept labels; index = class id
    stats: ClassStats | None  # classification only
    fingerprint: str  # sha256 of the files' bytes and the fields / split settings


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised row. Classification: `label_id`. Generation: `labels` (-100 on prompt)."""

    input_ids: Sequence[int]
    attention_mask: Sequence[int]
    label_id: int = -1
    labels: Sequence[int] = ()
    # Generation validation: the prompt alone, for greedy generation.
    prompt_ids: Sequence[int] = ()


@dataclass(frozen=True)
class EncodedData:
    """Tokenised splits, as the training loop consumes them."""

    train: Sequence[EncodedExample]
    validation: Sequence[EncodedExample]


# ---- what the training loop reports ------------------------------------------------------


class FailureReason(enum.Enum):
    """Why a job failed (the proto's FailureReason)."""

    OUT_OF_MEMORY = "out_of_memory"
    NAN_LOSS = "nan_loss"
    INVALID_INPUT = "invalid_input"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    SHUTDOWN = "shutdown"  # the trainer is stopping; not the job's fault


@dataclass(frozen=True)
class ProgressEvent:
    """Steps done."""

    epoch: float
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    samples_per_second: float


@dataclass(frozen=True)
class EvaluationEvent:
    """Validation predictions at the end of an epoch."""

    epoch: float
    step: int
    eval_loss: float
    predictions: Sequence[str]
    references: Sequence[str]
    prompts: Sequence[str] = ()
    labels: Sequence[str] = ()
    adapter_dir: str = ""  # where this epoch's adapter was saved ("" = not saved)
    posthoc_tau: float = 0.0  # the post-hoc logit adjustment the predictions were made with
    # Classification: each row's class log-probabilities (a float16 torch tensor, rows in
    # validation order, after the post-hoc adjustment), saved beside the epoch's adapter
    # for the study's ensemble (services/common/ensembles.py); never sent over gRPC.
    scores: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DatasetPreparedEvent:
    """The data as prepared for training."""

    train_rows: int
    validation_rows: int
    excluded_classes: Sequence[str]
    labels: Sequence[str]
    # Every label not trained on: (training rows, validation rows kept as misses).
    excluded_rows: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletedEvent:
    """Finished; the adapter is saved."""

    artifact_dir: str
    train_seconds: float


@dataclass(frozen=True)
class FailedEvent:
    """Failed."""

    reason: FailureReason
    message: str


Event = ProgressEvent | EvaluationEvent | DatasetPreparedEvent | CompletedEvent | FailedEvent


class Cancelled(Exception):
    """Raised inside the loop (between steps) when the job was cancelled."""


class NanLoss(Exception):
    """Raised inside the loop when the loss becomes NaN or infinite."""


@dataclass
class RunContext:
    """What the job manager gives the training loop: where to report, when to stop."""

    emit: Callable[[Event], None]
    should_stop: Callable[[], bool]
    progress_every_steps: int = 5
    extra: dict[str, Any] = field(default_factory=dict)
