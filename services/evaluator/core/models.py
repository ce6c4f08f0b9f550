"""Domain types of the evaluator: what is asked, what the judge port returns, what is reported."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.common.classification import ClassificationReport
from services.evaluator.core.bertscore import BertScoreResult
from services.evaluator.core.rescaling import Baseline, RawScorer, RescaleMode

DEFAULT_BERTSCORE_WEIGHT = 0.4
DEFAULT_JUDGE_WEIGHT = 0.6
DEFAULT_JUDGE_SAMPLE_SIZE = 5


class TaskType(enum.Enum):
    """What was predicted: labels or texts."""

    CLASSIFICATION = "classification"
    GENERATION = "generation"


@dataclass(frozen=True)
class JudgeOptions:
    """Whether the LLM judge takes part, with which model and on how many items."""

    enabled: bool = False
    model_id: str = ""
    sample_size: int | None = None  # None = DEFAULT_JUDGE_SAMPLE_SIZE
    seed: int = 0


@dataclass(frozen=True)
class Weights:
    """Weights of the combined score (validated by the evaluator)."""

    bertscore: float = DEFAULT_BERTSCORE_WEIGHT
    judge: float = DEFAULT_JUDGE_WEIGHT


@dataclass(frozen=True)
class EvaluationInput:
    """One evaluation request in domain terms."""

    task: TaskType | None
    predictions: Sequence[str]
    references: Sequence[str]
    prompts: Sequence[str] = ()
    labels: Sequence[str] = ()
    judge: JudgeOptions = field(default_factory=JudgeOptions)
    weights: Weights = field(default_factory=Weights)
    bertscore_rescale: RescaleMode | None = None  # None = the evaluator's setting


@dataclass(frozen=True)
class JudgeItem:
    """One item sent to the judge."""

    prompt: str
    candidate: str
    reference: str


@dataclass(frozen=True)
class JudgeBatch:
    """What the judge gateway answered for a batch of items."""

    scores: tuple[float | None, ...]  # None = not judged (parse failure, rate limit, ...)
    provider_model: str = ""

    @property
    def judged(self) -> int:
        """Items with a valid score."""
        return sum(1 for s in self.scores if s is not None)

    @property
    def mean(self) -> float:
        """Mean of the valid scores; 0 when there are none."""
        valid = [s for s in self.scores if s is not None]
        return sum(valid) / len(valid) if valid else 0.0


class JudgeScorer(Protocol):
    """The port to the judge gateway; raises the common domain errors."""

    async def score(
        self, model_id: str, items: Sequence[JudgeItem], timeout: float | None
    ) -> JudgeBatch:
        """Judges `items` with the judge `model_id` ("" = the gateway's default)."""
        ...


class BertScorer(RawScorer, Protocol):
    """What the evaluator needs of a BERTScore engine (built without its own rescaling):
    raw or rescaled pairwise scores (`RawScorer`), and bert-score's packaged baseline."""

    def packaged_baseline(self) -> Baseline:
        """bert-score's packaged baseline for the engine's model; ValueError when none ships."""
        ...


@dataclass(frozen=True)
class JudgeResult:
    """The judge's part of an evaluation."""

    model_id: str
    mean_score: float
    judged: int
    requested: int
    provider_model: str
    sample_indices: tuple[int, ...]

    @property
    def coverage(self) -> float:
        """Share of the sample that got a valid score."""
        return self.judged / self.requested if self.requested else 0.0


@dataclass(frozen=True)
class Evaluation:
    """The result of one evaluation."""

    task: TaskType
    num_examples: int
    objective: float
    objective_name: str
    combined: float = 0.0
    classification: ClassificationReport | None = None
    bertscore: BertScoreResult | None = None
    judge: JudgeResult | None = None
    seconds: float = 0.0
    reasoning_stripped: int = 0  # generation: predictions that had a reasoning block
