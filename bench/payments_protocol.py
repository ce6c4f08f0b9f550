"""The long-tail protocol on the synthetic payment comments of `make demo` (codes `60.01`, ...).

The same shape as `longtail_protocol.py`, on data that has the users' code hierarchy:

- Training: exactly what `make demo` trains on, `loratune demo-data` (seed 7): 636
  comments over 18 codes, the top code 160 rows (25%), the rare ones 8-20.
- Validation (the only thing selection looks at): up to 10 comments per code generated
  with seed 101, none of whose (case- and space-folded) texts is in training.
- Test (the selected model only, once): up to 40 comments per code generated with seeds
  202, 303, 404, 505 and 606, none of whose texts is in training or validation.
- Tail: the codes with <= 20 training rows; head: the others.

Comments from different seeds come from the same templates, so the held-out splits are
new fillings of known patterns (amounts, dates, typos, shared phrasings across codes), not
new phrasings: the numbers compare settings with each other, not with banking77's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from longtail_protocol import TAIL_MAX_ROWS, Protocol, Row, fold, tail_intents, write_rows

from services.cli.demo_data import generate

TRAIN_SEED = 7  # `make demo`'s data
VALIDATION_SEED = 101
TEST_SEEDS = (202, 303, 404, 505, 606)
VALIDATION_PER_CODE = 10
TEST_PER_CODE = 40


def _take(rows: Iterable[Row], per_code: int, seen: set[str]) -> list[Row]:
    """Up to `per_code` rows of each code whose text is not in `seen` (then added to it)."""
    taken: Counter[str] = Counter()
    kept = []
    for text, code in rows:
        key = fold(text)
        if taken[code] < per_code and key not in seen:
            seen.add(key)
            taken[code] += 1
            kept.append((text, code))
    return kept


def prepare(workdir: Path) -> Protocol:
    """Writes the trainer's CSVs (text,category) and returns the protocol's splits."""
    train: Sequence[Row] = generate(seed=TRAIN_SEED)
    seen = {fold(text) for text, _ in train}
    validation = _take(generate(seed=VALIDATION_SEED), VALIDATION_PER_CODE, seen)
    test = _take((row for seed in TEST_SEEDS for row in generate(seed=seed)), TEST_PER_CODE, seen)
    counts = Counter(code for _, code in train)
    workdir.mkdir(parents=True, exist_ok=True)
    return Protocol(
        train_path=write_rows(train, workdir / "train.csv"),
        validation_path=write_rows(validation, workdir / "validation.csv"),
        train_rows=len(train),
        train_counts=counts,
        tail=tail_intents(counts, None),
        held_out={},
        validation=tuple(validation),
        test=tuple(test),
        smoke=False,
        validation_seed=VALIDATION_SEED,
    )


__all__ = ["TAIL_MAX_ROWS", "prepare"]
