"""Benchmark: LoRA classification with class balancing vs a frozen encoder, long-tailed banking77.

Trains on `train_longtail.csv` (1,614 rows, 77 intents, the rarest with 8 rows) and
scores on the full `test.csv` (3,080 rows, 40 per intent):

- the baseline a user tries first: the same base model frozen, mean-pooled sentence
  embeddings, and scikit-learn's LogisticRegression(class_weight="balanced") with its
  defaults (on L2-normalised embeddings the default C=1 over-regularises: 0.85);
- our trainer's path (`LocalRunner`: validation, base model cache, tokenisation,
  `loop.train`, saved adapter) with the same budget for each balancing setting: plain
  cross-entropy, focal loss only, class weights only, the weighted sampler only, and
  focal loss + class weights (the trainer's defaults).

Prints macro-F1, the mean F1 of the tail intents (<= 20 training rows), accuracy and
train seconds per configuration. The LoRA runs' test predictions come from the saved
adapter reloaded with `artifacts.predict_labels` (the path a user takes). The loop's
per-epoch evaluation runs on a small fixed slice of test.csv (`--val-per-class` rows per
intent; it selects nothing, it only shows the curve), and the reloaded adapter must
predict that slice exactly as the trained model did.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/banking77_longtail.py [--epochs 5] [--lr 5e-4]
        [--batch-size 32] [--max-seq-length 64] [--configs ce,focal,weights,sampler,focal+weights]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from services.evaluator.core.bertscore import packaged_minilm_path
from services.trainer.core import loop, models
from services.trainer.core.artifacts import load_adapter_for_inference, predict_labels
from services.trainer.core.runner import LocalRunner
from services.trainer.core.types import (
    DEFAULT_LOOP_OPTIONS,
    BalancingSpec,
    DatasetSpec,
    EvaluationEvent,
    Event,
    JobSpec,
    LoopOptions,
    LoraSpec,
    RunContext,
    Task,
    TrainingSpec,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
TAIL_MAX_ROWS = 20

# name -> (focal gamma, class weights, weighted sampler)
CONFIGS: dict[str, tuple[float, bool, bool]] = {
    "ce": (0.0, False, False),
    "focal": (2.0, False, False),
    "weights": (0.0, True, False),
    "sampler": (0.0, False, True),
    "focal+weights": (2.0, True, False),
}


@dataclass(frozen=True)
class Score:
    name: str
    macro_f1: float
    tail_f1: float
    accuracy: float
    train_seconds: float
    note: str = ""


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


def score(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str],
    train_counts: Counter[str],
    seconds: float,
    note: str = "",
) -> Score:
    labels = sorted(train_counts)
    per_class = f1_score(references, predictions, labels=labels, average=None, zero_division=0)
    tail = [f for label, f in zip(labels, per_class, strict=True) if train_counts[label] <= 20]
    return Score(
        name=name,
        macro_f1=float(np.mean(per_class)),
        tail_f1=float(np.mean(tail)),
        accuracy=float(accuracy_score(references, predictions)),
        train_seconds=seconds,
        note=note,
    )


# ---- the baseline: frozen encoder, mean pooling, logistic regression -----------------------


def embed(model_path: str, texts: Sequence[str], max_length: int, batch_size: int) -> np.ndarray:
    """Attention-masked mean of the last hidden state (all-MiniLM-L6-v2's own pooling)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            chunks.append(mean.numpy())
    return np.concatenate(chunks)


def run_baseline(
    model_path: str,
    train: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]],
    max_length: int,
    counts: Counter[str],
) -> Score:
    started = time.perf_counter()
    x_train = embed(model_path, [t for t, _ in train], max_length, 64)
    classifier = LogisticRegression(class_weight="balanced", max_iter=2000)
    classifier.fit(x_train, [label for _, label in train])
    seconds = time.perf_counter() - started
    x_test = embed(model_path, [t for t, _ in test], max_length, 64)
    predictions = classifier.predict(x_test).tolist()
    return score(
        "frozen encoder + LogReg(balanced)",
        predictions,
        [label for _, label in test],
        counts,
        seconds,
    )


# ---- our trainer ---------------------------------------------------------------------------


def write_validation(test: Sequence[tuple[str, str]], per_class: int, path: Path) -> list[str]:
    """The first `per_class` rows of every intent of test.csv, as a CSV; returns their labels."""
    taken: Counter[str] = Counter()
    rows = []
    for text, label in test:
        if taken[label] < per_class:
            taken[label] += 1
            rows.append((text, label))
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    return [text for text, _ in rows]


def job_spec(
    args: argparse.Namespace, name: str, out_dir: Path, model_path: str, validation: Path
) -> JobSpec:
    gamma, weights, sampler = CONFIGS[name]
    return JobSpec(
        job_id=f"bench-{name}",
        base_model=model_path,
        dataset=DatasetSpec(
            uri=str(args.train),
            task=Task.CLASSIFICATION,
            text_field="text",
            label_field="category",
            validation_uri=str(validation),
            seed=args.seed,
        ),
        lora=LoraSpec(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05),
        training=TrainingSpec(
            learning_rate=args.lr,
            num_epochs=args.epochs,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            warmup_ratio=args.warmup_ratio,
            seed=args.seed,
        ),
        balancing=BalancingSpec(
            focal_gamma=gamma, use_class_weights=weights, use_weighted_sampler=sampler
        ),
        output_dir=str(out_dir / name),
    )


def loop_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoopOptions:
    """The trainer's loop options with this run's ablation flags applied."""
    changes: dict[str, Any] = {"linear_probe": not args.no_probe}
    for option, value in (
        ("head_lr_multiplier", args.head_lr_multiplier),
        ("head_min_learning_rate", args.head_min_lr),
        ("head_only_fraction", args.head_only_fraction),
    ):
        if value is not None:
            changes[option] = value
    try:
        return dataclasses.replace(DEFAULT_LOOP_OPTIONS, **changes)
    except ValueError as err:
        parser.error(str(err))


def run_lora(
    runner: LocalRunner,
    spec: JobSpec,
    name: str,
    test: Sequence[tuple[str, str]],
    validation_texts: Sequence[str],
    counts: Counter[str],
    args: argparse.Namespace,
) -> Score:
    evaluations: list[EvaluationEvent] = []

    def emit(event: Event) -> None:
        if isinstance(event, EvaluationEvent):
            evaluations.append(event)

    prepared = runner.validate(spec)
    completed = runner.run(spec, prepared, RunContext(emit=emit, should_stop=lambda: False))
    curve = " ".join(
        f"{f1_score(e.references, e.predictions, average='macro', zero_division=0):.3f}"
        for e in evaluations
    )
    loaded = load_adapter_for_inference(completed.artifact_dir, "cpu")
    predictions = predict_labels(
        loaded, [t for t, _ in test], max_length=args.max_seq_length, batch_size=64
    )
    reloaded = predict_labels(
        loaded, validation_texts, max_length=args.max_seq_length, batch_size=64
    )
    last = evaluations[-1].predictions
    agree = sum(a == b for a, b in zip(reloaded, last, strict=True))
    note = (
        f"per-epoch macro-F1 on the {len(last)}-row slice: {curve}; "
        f"reloaded adapter agrees with the trained model on {agree}/{len(last)}"
    )
    del loaded
    references = [label for _, label in test]
    return score(name, predictions, references, counts, completed.train_seconds, note)


def print_table(scores: Sequence[Score]) -> None:
    width = max(len(s.name) for s in scores)
    print(f"\n{'config':<{width}}  macro-F1  tail-F1  accuracy  train s")
    for s in scores:
        print(
            f"{s.name:<{width}}  {s.macro_f1:8.4f}  {s.tail_f1:7.4f}  {s.accuracy:8.4f}  "
            f"{s.train_seconds:7.1f}"
        )
    notes = [s for s in scores if s.note]
    if notes:
        print()
        for s in notes:
            print(f"{s.name}: {s.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "train_longtail.csv")
    parser.add_argument("--test", type=Path, default=DATA / "test.csv")
    parser.add_argument(
        "--model", default="", help="model path or hub name (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated LoRA configs among {', '.join(CONFIGS)} (empty: baseline only)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine two threads spin-wait on each "
        "other and a MiniLM step took 3.7 s instead of 0.65 s)",
    )
    parser.add_argument(
        "--pooling",
        choices=["default", models.POOLING_MEAN, models.POOLING_NATIVE],
        default="default",
        help="ablation: force an encoder's pooling for the whole run (default: the trainer's)",
    )
    parser.add_argument(
        "--head-lr-multiplier",
        type=float,
        default=None,
        help="ablation: the head's lr over the adapter's (trainer: "
        f"{DEFAULT_LOOP_OPTIONS.head_lr_multiplier:g})",
    )
    parser.add_argument(
        "--head-min-lr",
        type=float,
        default=None,
        help="ablation: the head's lowest lr (trainer: "
        f"{DEFAULT_LOOP_OPTIONS.head_min_learning_rate:g})",
    )
    parser.add_argument(
        "--head-only-fraction",
        type=float,
        default=None,
        help=f"ablation: share of steps training the head alone (trainer: "
        f"{DEFAULT_LOOP_OPTIONS.head_only_fraction:g})",
    )
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="ablation: no linear probe of the fresh head before fine-tuning (it then trains "
        "at the head learning rate below)",
    )
    parser.add_argument(
        "--base-dropout",
        type=float,
        default=None,
        help="ablation: set every dropout of the loaded base model (not LoRA's) to this",
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=5,
        help="rows per intent of test.csv for the loop's per-epoch evaluation",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pooling != "default":
        forced = args.pooling
        # Training and reloading both ask models.default_pooling (through load_base_model).
        models.default_pooling = lambda name, model: forced  # type: ignore[assignment]
    if args.base_dropout is not None:
        p = args.base_dropout
        load = models.load_base_model

        def load_with_dropout(*a: Any, **k: Any) -> tuple[torch.nn.Module, Any]:
            model, tokenizer = load(*a, **k)
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = p
            return model, tokenizer

        models.load_base_model = load_with_dropout  # type: ignore[assignment]
    options = loop_options(args, parser)
    model_path = args.model or packaged_minilm_path()
    train = read_rows(args.train)
    test = read_rows(args.test)
    counts = Counter(label for _, label in train)
    tail = sum(1 for n in counts.values() if n <= TAIL_MAX_ROWS)
    print(
        f"train {len(train)} rows, {len(counts)} classes ({tail} tail classes with <= "
        f"{TAIL_MAX_ROWS} rows, {min(counts.values())}..{max(counts.values())} rows); "
        f"test {len(test)} rows; model {Path(model_path).name}"
    )
    print(
        f"LoRA budget: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
        f"rank {args.rank}, max_seq_length {args.max_seq_length}, seed {args.seed}, "
        f"{args.threads} threads; pooling {args.pooling}; "
        + (
            f"linear probe, then head lr {args.lr:g}"
            if options.linear_probe
            else f"no probe, head lr {loop.head_learning_rate(args.lr, options):g}"
        )
        + f"; head alone for {options.head_only_fraction:g} of the steps"
    )
    scores: list[Score] = []
    if not args.no_baseline:
        scores.append(run_baseline(model_path, train, test, args.max_seq_length, counts))
        print(f"done: {scores[-1]}", flush=True)
    runner = LocalRunner(device="cpu", options=options)
    with tempfile.TemporaryDirectory(prefix="banking77-bench-") as out:
        validation = Path(out) / "validation.csv"
        validation_texts = write_validation(test, args.val_per_class, validation)
        for name in [c for c in args.configs.split(",") if c]:
            if name not in CONFIGS:
                parser.error(f"unknown config {name!r}")
            spec = job_spec(args, name, Path(out), model_path, validation)
            scores.append(run_lora(runner, spec, name, test, validation_texts, counts, args))
            print(f"done: {scores[-1]}", flush=True)
    runner.release()
    print_table(scores)


if __name__ == "__main__":
    main()
