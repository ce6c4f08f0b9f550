"""The long-tail banking77 protocol the benchmarks share: train, select on validation, test once.

- Training: `train_longtail.csv` (1,614 rows, 77 intents, 65 of them with <= 20 rows),
  less the 10 rows held out below: 1,604 rows.
- Validation, the only thing any selection looks at (best epoch, best trial, the
  baseline's C): exactly 10 rows per intent, 77 x 10 = 770, from the rows of the full
  `train.csv` that neither `train_longtail.csv` nor `test.csv` holds (texts compared
  case- and space-folded), grouped by intent in file order; the intents, in sorted
  order, are shuffled one after the other with a single `random.Random(SPLIT_SEED)` and
  the first 10 of each kept. One intent has no such row: train_longtail.csv holds all
  159 train.csv rows of pending_card_payment, so its 10 come from those (shuffled by the
  same generator) and leave training (149 rows left: still a head intent, and the tail's
  training rows are untouched). Written as a CSV the trainer reads as `validation_uri`;
  `prepare` checks the counts and that no validation text is in the training file or
  test.csv.
- Test: the selected model only, once, on the full `test.csv` (3,080 rows, 40 per
  intent): macro-F1, tail F1 (mean F1 of the 65 intents with <= 20 rows in the
  training file, a set computed from the file), head F1 (the other 12) and accuracy.

`--limit-train` / `--limit-test` take a few rows per intent for smoke tests only; the
numbers they print are not the protocol's.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.classification import classification_report

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
TRAIN_LONGTAIL = DATA / "train_longtail.csv"
TRAIN_FULL = DATA / "train.csv"
TEST = DATA / "test.csv"

SPLIT_SEED = 2024
VALIDATION_PER_INTENT = 10
TAIL_MAX_ROWS = 20
INTENTS = 77
TAIL_INTENTS = 65
TEST_ROWS = 3080
SEEDS_NOTE = "differences under one point (0.01) of macro-F1 need the three seeds (--seeds 1,2,3)"

Row = tuple[str, str]  # (text, intent)


class ProtocolError(RuntimeError):
    """The data does not match what the protocol expects (counts, overlaps)."""


@dataclass(frozen=True)
class ProtocolOptions:
    """Where the data comes from, and the smoke-test subsets."""

    train: Path = TRAIN_LONGTAIL
    full_train: Path = TRAIN_FULL
    test: Path = TEST
    split_seed: int = SPLIT_SEED
    limit_train: int = 0  # rows per intent of the training file; 0 = all
    limit_test: int = 0  # rows per intent of the test file; 0 = all

    @property
    def smoke(self) -> bool:
        """Whether a subset is in use (the numbers are then not the protocol's)."""
        return bool(self.limit_train or self.limit_test)


@dataclass(frozen=True)
class Protocol:
    """The files and rows of one run of the protocol."""

    train_path: Path  # what the trainer reads: the training file less the held-out rows
    validation_path: Path
    train_rows: int  # rows in train_path (fewer under --limit-train)
    train_counts: Counter[str]  # per intent, the training file less the held-out rows
    tail: frozenset[str]  # from the training file itself
    held_out: dict[str, int]  # intent -> training rows that went to validation
    validation: tuple[Row, ...]
    test: tuple[Row, ...]
    smoke: bool
    validation_seed: int

    def describe(self) -> str:
        """One line for the benchmark's header."""
        counts = self.train_counts.values()
        held = ", ".join(f"{n} of {label}" for label, n in sorted(self.held_out.items()))
        return (
            f"train {self.train_rows} rows ({len(self.train_counts)} intents, {len(self.tail)} "
            f"tail intents with <= {TAIL_MAX_ROWS} rows, {min(counts)}..{max(counts)} rows); "
            f"validation {len(self.validation)} rows drawn from train.csv with seed "
            f"{self.validation_seed}"
            + (f" ({held} held out of training)" if held else "")
            + f"; test {len(self.test)} rows, scored once per selected model"
            + ("; SMOKE SUBSET: not the protocol's numbers" if self.smoke else "")
        )


@dataclass(frozen=True)
class TestScore:
    """The selected model's one score on test.csv."""

    macro_f1: float
    tail_f1: float
    head_f1: float
    accuracy: float


def read_rows(path: Path) -> list[Row]:
    """(text, category) rows of a banking77 CSV."""
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


def write_rows(rows: Iterable[Row], path: Path) -> Path:
    """Writes rows as a text,category CSV; returns the path."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return path


def fold(text: str) -> str:
    """A text compared case- and whitespace-insensitively."""
    return " ".join(text.casefold().split())


def first_per_intent(rows: Sequence[Row], per_intent: int) -> list[Row]:
    """The first `per_intent` rows of every intent, in file order (smoke subsets)."""
    taken: Counter[str] = Counter()
    kept = []
    for text, label in rows:
        if taken[label] < per_intent:
            taken[label] += 1
            kept.append((text, label))
    return kept


def tail_intents(counts: Counter[str], expected: int | None = TAIL_INTENTS) -> frozenset[str]:
    """Intents with <= TAIL_MAX_ROWS training rows; checked against `expected` when given."""
    tail = frozenset(label for label, n in counts.items() if n <= TAIL_MAX_ROWS)
    if expected is not None and len(tail) != expected:
        raise ProtocolError(f"{len(tail)} tail intents in the training file, expected {expected}")
    return tail


@dataclass(frozen=True)
class Split:
    """The validation rows drawn, and the training rows left."""

    validation: list[Row]
    train: list[Row]
    held_out: dict[str, int]  # intent -> training rows moved to validation


def draw_validation(
    full_train: Sequence[Row],
    train: Sequence[Row],
    test: Sequence[Row],
    seed: int = SPLIT_SEED,
    per_intent: int = VALIDATION_PER_INTENT,
) -> Split:
    """`per_intent` rows per intent of `full_train` that neither `train` nor `test` holds.

    Candidates are grouped by intent in file order; one `random.Random(seed)` shuffles
    the groups in sorted intent order and the first `per_intent` of each are kept. An
    intent with too few unused rows (banking77: pending_card_payment, all of whose 159
    rows are in train_longtail.csv) takes the rest from its own training rows, shuffled
    by the same generator, which then leave training; only a head intent may give rows,
    and it stays one, so the tail's training data is never touched.
    """
    in_test = {fold(text) for text, _ in test}
    in_train = {fold(text) for text, _ in train}
    unused: dict[str, list[Row]] = defaultdict(list)
    seen: set[str] = set()
    for text, label in full_train:
        key = fold(text)
        if key not in in_train and key not in in_test and key not in seen:
            seen.add(key)
            unused[label].append((text, label))
    by_intent: dict[str, list[Row]] = defaultdict(list)
    for text, label in train:
        by_intent[label].append((text, label))
    rng = random.Random(seed)
    validation: list[Row] = []
    moved: set[Row] = set()
    held_out: dict[str, int] = {}
    for label in sorted(by_intent):
        candidates = unused.get(label, [])
        rng.shuffle(candidates)
        taken = candidates[:per_intent]
        short = per_intent - len(taken)
        if short:
            own = [row for row in by_intent[label] if fold(row[0]) not in in_test]
            if len(by_intent[label]) - short <= TAIL_MAX_ROWS or len(own) < short:
                raise ProtocolError(
                    f"{label}: {len(taken)} unused rows in train.csv and too few training rows "
                    f"({len(by_intent[label])}) to hold {short} out"
                )
            rng.shuffle(own)
            taken += own[:short]
            moved.update(own[:short])
            held_out[label] = short
        validation.extend(taken)
    kept = [row for row in train if row not in moved]
    return Split(validation=validation, train=kept, held_out=held_out)


def check_validation(
    validation: Sequence[Row], train: Sequence[Row], test: Sequence[Row], per_intent: int
) -> None:
    """Exactly `per_intent` rows for every training intent, no text shared with train or test."""
    counts = Counter(label for _, label in validation)
    intents = {label for _, label in train}
    if set(counts) != intents or set(counts.values()) != {per_intent}:
        raise ProtocolError(
            f"validation has {len(counts)} intents with {sorted(set(counts.values()))} rows "
            f"each; expected the {len(intents)} training intents with {per_intent}"
        )
    texts = {fold(text) for text, _ in validation}
    if len(texts) != len(validation):
        raise ProtocolError("validation repeats a text")
    for name, rows in (("the training file", train), ("test.csv", test)):
        shared = texts & {fold(text) for text, _ in rows}
        if shared:
            raise ProtocolError(f"{len(shared)} validation texts are in {name}")


def prepare(workdir: Path, options: ProtocolOptions) -> Protocol:
    """Reads the files, draws and checks the validation split, writes the trainer's CSVs."""
    train = read_rows(options.train)
    test = read_rows(options.test)
    standard = options.train == TRAIN_LONGTAIL
    tail = tail_intents(Counter(label for _, label in train), TAIL_INTENTS if standard else None)
    intents = {label for _, label in train}
    if standard and len(intents) != INTENTS:
        raise ProtocolError(f"{len(intents)} intents in the training file, expected {INTENTS}")
    if options.test == TEST and (len(test) != TEST_ROWS or {lab for _, lab in test} != intents):
        raise ProtocolError(f"test.csv: {len(test)} rows, expected {TEST_ROWS} over the intents")
    split = draw_validation(read_rows(options.full_train), train, test, options.split_seed)
    check_validation(split.validation, split.train, test, VALIDATION_PER_INTENT)
    counts = Counter(label for _, label in split.train)
    if tail_intents(counts, None) != tail:
        raise ProtocolError("holding validation rows out changed the tail")
    workdir.mkdir(parents=True, exist_ok=True)
    train_rows = split.train
    if options.limit_train:
        train_rows = first_per_intent(train_rows, options.limit_train)
    if options.limit_test:
        test = first_per_intent(test, options.limit_test)
    return Protocol(
        train_path=write_rows(train_rows, workdir / "train.csv"),
        validation_path=write_rows(split.validation, workdir / "validation.csv"),
        train_rows=len(train_rows),
        train_counts=counts,
        tail=tail,
        held_out=split.held_out,
        validation=tuple(split.validation),
        test=tuple(test),
        smoke=options.smoke,
        validation_seed=options.split_seed,
    )


def score_test(predictions: Sequence[str], protocol: Protocol) -> TestScore:
    """Macro-F1 over the training intents, tail / head F1 and accuracy on the test rows."""
    references = [label for _, label in protocol.test]
    report = classification_report(predictions, references, sorted(protocol.train_counts))
    f1 = {c.label: c.f1 for c in report.per_class if c.label in protocol.train_counts}
    head = [f for label, f in f1.items() if label not in protocol.tail]
    return TestScore(
        macro_f1=statistics.fmean(f1.values()),
        tail_f1=statistics.fmean(f1[label] for label in protocol.tail),
        head_f1=statistics.fmean(head) if head else float("nan"),
        accuracy=report.accuracy,
    )


def validation_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The selection objective: macro-F1 as the evaluator computes it."""
    return classification_report(predictions, references).f1_macro


def predict_adapter(
    adapter_dir: Path | str, texts: Sequence[str], max_length: int, device: str | None = None
) -> list[str]:
    """Labels a saved adapter, reloaded the way a user reloads it, predicts for `texts`."""
    from services.trainer.core.artifacts import load_adapter_for_inference, predict_labels

    loaded = load_adapter_for_inference(adapter_dir, device)
    try:
        return predict_labels(loaded, texts, max_length=max_length, batch_size=64)
    finally:
        del loaded


def score_adapter(
    adapter_dir: Path | str, protocol: Protocol, max_length: int, device: str | None = None
) -> TestScore:
    """The selected adapter's one score on test.csv."""
    texts = [text for text, _ in protocol.test]
    return score_test(predict_adapter(adapter_dir, texts, max_length, device), protocol)


# ---- command line and summaries ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The protocol's flags, the same in every benchmark that follows it."""
    group = parser.add_argument_group("protocol")
    group.add_argument("--train", type=Path, default=TRAIN_LONGTAIL)
    group.add_argument("--full-train", type=Path, default=TRAIN_FULL, help="validation source")
    group.add_argument("--test", type=Path, default=TEST)
    group.add_argument(
        "--split-seed", type=int, default=SPLIT_SEED, help="seed of the validation draw"
    )
    group.add_argument(
        "--limit-train", type=int, default=0, help="smoke tests: rows per intent to train on"
    )
    group.add_argument(
        "--limit-test", type=int, default=0, help="smoke tests: rows per intent of test.csv"
    )


def options_from(args: argparse.Namespace) -> ProtocolOptions:
    """ProtocolOptions from the flags of add_arguments."""
    return ProtocolOptions(
        train=args.train,
        full_train=args.full_train,
        test=args.test,
        split_seed=args.split_seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
    )


def parse_seeds(text: str) -> list[int]:
    """ "1,2,3" -> [1, 2, 3]."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"seeds must be integers: {text!r}") from err
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """'mean ± sample std' (just the value for one run)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
