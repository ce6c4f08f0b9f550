"""BERTScore rescaling: bert-score's packaged baselines, or one computed from the references.

Raw BERTScore F1 sits in a narrow band (unrelated sentences already score well above 0),
so differences between trials look small next to a judge's 0-100 scale. Rescaling maps
the "unrelated" level ``b`` to 0 with ``s -> (s - b) / (1 - b)``, exactly as bert-score
does with its packaged baseline files; every difference is then stretched by
``1 / (1 - b)``. bert-score ships baselines only for some hub models and languages (none
for Russian, none for a local model folder), so the ``references`` kind computes ``b``
from the request's own references: the mean score of mismatched reference pairs
(reference i against a different reference j). Every trial of a study scores against
the same references, so the baseline is computed once and cached by their digest, which
the BERTScore hash records.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from services.evaluator.core.bertscore import BertScoreResult

__all__ = [
    "MAX_BASELINE_PAIRS",
    "Baseline",
    "BaselineUnavailable",
    "ReferenceBaselines",
    "RescaleMode",
    "compute_reference_baseline",
    "distinct_references",
    "mismatched_pairs",
    "references_digest",
]

logger = logging.getLogger(__name__)

MAX_BASELINE_PAIRS = 1000
"""Most mismatched reference pairs scored for one baseline (bounds its cost)."""

DIGEST_HEX_IN_HASH = 12
"""Hex digits of the references' digest the BERTScore hash records."""

_MIN_DENOMINATOR = 1e-6


class RescaleMode(enum.Enum):
    """How BERTScore is rescaled; the values are what ``LORATUNE_BERTSCORE_RESCALE`` takes."""

    NONE = "none"
    PACKAGED = "packaged"  # bert-score's baseline file for (lang, hub model)
    REFERENCES = "references"  # computed from the request's references


@dataclass(frozen=True)
class Baseline:
    """The "unrelated" level ``(P, R, F)`` that rescaling maps to 0: ``s -> (s - b) / (1 - b)``."""

    kind: RescaleMode
    precision: float
    recall: float
    f1: float
    tag: str
    """What the BERTScore hash gets appended (after ``-``): ``rescaled`` for bert-score's
    packaged baseline (its own hash), ``rescaled-refs:<12 hex of the references' digest>``."""
    pairs: int = 0
    """Mismatched reference pairs the baseline was computed from (0 for a packaged one)."""


class BaselineUnavailable(ValueError):
    """No baseline can be computed from these references (too few distinct, or degenerate)."""


class RawScorer(Protocol):
    """What computing a baseline needs of a BERTScore engine: raw pairwise scores."""

    @property
    def hash(self) -> str:
        """The engine's settings string (model, layer, idf, versions)."""
        ...

    def score(
        self,
        candidates: Sequence[str],
        references: Sequence[str],
        baseline: Baseline | None = None,
        *,
        idf_references: Sequence[str] | None = None,
    ) -> BertScoreResult:
        """Scores candidates against references pairwise (raw when ``baseline`` is None)."""
        ...


def references_digest(references: Sequence[str]) -> str:
    """SHA-256 (hex) of the references in order, each length-prefixed so none can blur."""
    digest = hashlib.sha256()
    for text in references:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def distinct_references(references: Sequence[str]) -> list[str]:
    """Non-empty references, each text once (first occurrence, surrounding spaces ignored).

    Identical texts must never be paired (they would score 1 and lift the "unrelated"
    level); empty ones would score 0 and lower it.
    """
    seen: set[str] = set()
    out: list[str] = []
    for text in references:
        key = text.strip()
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def mismatched_pairs(n: int, max_pairs: int = MAX_BASELINE_PAIRS) -> list[tuple[int, int]]:
    """Deterministic ``(i, j)`` pairs with ``i != j`` over ``n`` items, at most ``max_pairs``.

    All ordered pairs when they fit; otherwise cyclic shifts ``j = (i + s) % n`` with the
    shifts spread evenly over ``1..n-1`` (not neighbours: datasets are often sorted by
    topic, so a reference and the next one may well be related), each item appearing once
    as candidate and once as reference per shift, thinned to ``max_pairs`` by an even stride.
    """
    if n < 2 or max_pairs < 1:
        return []
    if n * (n - 1) <= max_pairs:
        return [(i, j) for i in range(n) for j in range(n) if i != j]
    shift_count = min(n - 1, -(-max_pairs // n))  # enough shifts to reach max_pairs
    shifts = sorted({k * n // (shift_count + 1) for k in range(1, shift_count + 1)} - {0})
    pairs = [(i, (i + s) % n) for s in shifts for i in range(n)]
    if len(pairs) > max_pairs:
        pairs = [pairs[k * len(pairs) // max_pairs] for k in range(max_pairs)]
    return pairs


def compute_reference_baseline(
    scorer: RawScorer, references: Sequence[str], max_pairs: int = MAX_BASELINE_PAIRS
) -> Baseline:
    """The mean raw ``(P, R, F)`` of mismatched reference pairs, as a ``REFERENCES`` baseline.

    With idf on, the idf weights come from ``references`` (as in the real call), so the
    baseline is scored exactly as the predictions are.

    Raises:
        BaselineUnavailable: fewer than two distinct non-empty references, or references so
            alike that the baseline leaves nothing to rescale into.
    """
    texts = distinct_references(references)
    if len(texts) < 2:
        raise BaselineUnavailable(
            f"needs at least 2 distinct non-empty references to compute a baseline from "
            f"mismatched pairs (got {len(texts)})"
        )
    pairs = mismatched_pairs(len(texts), max_pairs)
    raw = scorer.score(
        [texts[i] for i, _ in pairs],
        [texts[j] for _, j in pairs],
        idf_references=list(references),
    )
    values = (raw.precision_mean, raw.recall_mean, raw.f1_mean)
    if any(1.0 - v < _MIN_DENOMINATOR for v in values):
        raise BaselineUnavailable(
            f"the references are too alike to rescale against: mismatched pairs already "
            f"score P/R/F = {values[0]:.6f}/{values[1]:.6f}/{values[2]:.6f}"
        )
    digest = references_digest(references)
    return Baseline(
        kind=RescaleMode.REFERENCES,
        precision=values[0],
        recall=values[1],
        f1=values[2],
        tag=f"rescaled-refs:{digest[:DIGEST_HEX_IN_HASH]}",
        pairs=len(pairs),
    )


class ReferenceBaselines:
    """Baselines computed from references, cached by (engine settings, references' digest).

    A study's trials all score against the same references, so after the first trial the
    baseline costs a digest. The cache is an LRU of ``max_entries``; computing holds one lock,
    as the engine serialises its work anyway and two trials starting together must not both
    pay for the same baseline.
    """

    def __init__(self, max_entries: int = 16, max_pairs: int = MAX_BASELINE_PAIRS) -> None:
        """Create an empty cache of at most ``max_entries`` baselines."""
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._max_pairs = max_pairs
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Baseline] = OrderedDict()
        self.computed = 0
        """Baselines computed so far (cache misses)."""

    def get(self, scorer: RawScorer, references: Sequence[str]) -> tuple[Baseline, bool]:
        """The baseline of ``references`` for ``scorer``, and whether it was computed now.

        Raises:
            BaselineUnavailable: see ``compute_reference_baseline``; such failures are not cached.
        """
        key = (scorer.hash, references_digest(references))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached, False
            started = time.perf_counter()
            baseline = compute_reference_baseline(scorer, references, self._max_pairs)
            seconds = time.perf_counter() - started
            self.computed += 1
            self._cache[key] = baseline
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        logger.info(
            "BERTScore baseline from %d mismatched reference pairs: P=%.4f R=%.4f F=%.4f "
            "(%s, %.2fs)",
            baseline.pairs,
            baseline.precision,
            baseline.recall,
            baseline.f1,
            baseline.tag,
            seconds,
        )
        return baseline, True

    def __len__(self) -> int:
        """Baselines currently cached."""
        with self._lock:
            return len(self._cache)
