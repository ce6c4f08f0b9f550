"""Benchmark: LoRA classification with class balancing vs a frozen encoder, long-tailed banking77.

Follows the protocol of `longtail_protocol.py`: train on `train_longtail.csv` (less 10
rows held out for validation), select on the 770-row validation split drawn from the
unused rows of `train.csv`, and score only the selected model, once, on the full
`test.csv` (3,080 rows, 40 per intent):

- the baseline a user tries first: the same base model frozen, mean-pooled sentence
  embeddings, and scikit-learn's LogisticRegression(class_weight="balanced"), its C
  chosen on the validation split from a small grid (deterministic: run once; its
  seconds include the search);
- our trainer's path (`LocalRunner`: validation, base model cache, tokenisation,
  `loop.train`, saved adapter) with the same budget for each balancing setting: plain
  cross-entropy, focal loss only, class weights only, the weighted sampler only, and
  focal loss + class weights (the trainer's defaults). The loop evaluates the validation
  split after every epoch; the best epoch by validation macro-F1 (the earliest of
  equals) is kept as the trainer's clients keep it (`keep_adapter`), reloaded with
  `load_adapter_for_inference`, and only it predicts test.csv (`predict_labels`). The
  reloaded adapter must predict the validation split as the trained model did.

Each LoRA configuration runs once per `--seeds` seed (training seed; the validation
split has its own fixed `--split-seed`). Prints validation macro-F1, test macro-F1, the
mean F1 of the 65 tail intents (<= 20 training rows), of the 12 head intents, accuracy
and train seconds, per run and as mean ± std over the seeds; differences under one
point need the three seeds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/banking77_longtail.py [--seeds 1,2,3]
        [--epochs 5] [--lr 5e-4] [--batch-size 32] [--max-seq-length 64] [--threads 1]
        [--configs ce,focal,weights,sampler,focal+weights] [--no-baseline] [--data payments]
        [--limit-train N --limit-test N: smoke tests only]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import longtail_protocol as protocol
import numpy as np
import torch
from longtail_protocol import Protocol, TestScore
from sklearn.linear_model import LogisticRegression

from services.evaluator.core.bertscore import packaged_minilm_path
from services.optimizer.core.results import keep_adapter
from services.trainer.core import loop, models
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

BASELINE = "frozen encoder + LogReg(balanced)"
# The baseline's C, chosen on the validation split (the embeddings are not normalised).
C_GRID = (0.0625, 0.25, 1.0, 4.0, 16.0, 64.0)

# name -> BalancingSpec fields (and "probe_only" for TrainingSpec), over plain cross-entropy
CONFIGS: dict[str, dict[str, Any]] = {
    "ce": {},
    "focal": {"focal_gamma": 2.0},
    "weights": {"use_class_weights": True},
    "sampler": {"use_weighted_sampler": True},
    "sqrt-sampler": {"use_weighted_sampler": True, "sampler_power": 0.5},
    "focal+weights": {"focal_gamma": 2.0, "use_class_weights": True},
    "probe-only": {"probe_only": True},
    # The default space's probe-only point: the floor a study evaluates first.
    "probe-only+posthoc-la": {"probe_only": True, "posthoc_logit_adjustment": True},
    "posthoc-la": {"posthoc_logit_adjustment": True},
    "la-loss": {"logit_adjust_tau": 1.0},
    "two-stage": {"two_stage": True},
    "two-stage+posthoc-la": {"two_stage": True, "posthoc_logit_adjustment": True},
    "sampler+posthoc-la": {"use_weighted_sampler": True, "posthoc_logit_adjustment": True},
    # banking77's intents group by their first word (card_*, top_up_*, transfer_*, ...).
    "hierarchy": {"group_separator": "_"},
    "hierarchy+posthoc-la": {"group_separator": "_", "posthoc_logit_adjustment": True},
    # The payment codes' own hierarchy (--data payments): `60.01` is in group `60`.
    "codes-hierarchy": {"group_separator": "."},
    "codes-hierarchy+posthoc-la": {"group_separator": ".", "posthoc_logit_adjustment": True},
}
_DEFAULT_CONFIGS = ("ce", "focal", "weights", "sampler", "focal+weights")


@dataclass(frozen=True)
class Run:
    """One configuration at one seed: what selection saw, and the one test score."""

    name: str
    seed: int | None  # None: the deterministic baseline
    validation_f1: float  # of the selected epoch / C
    test: TestScore
    train_seconds: float
    note: str = ""

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name} s{self.seed}"

    def summary(self) -> str:
        t = self.test
        return (
            f"{self.label}: validation macro-F1 {self.validation_f1:.4f}; test macro-F1 "
            f"{t.macro_f1:.4f}, tail {t.tail_f1:.4f}, head {t.head_f1:.4f}, accuracy "
            f"{t.accuracy:.4f}; {self.train_seconds:.1f} s"
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


def cv_choice(x: np.ndarray, y: Sequence[str], grid: Sequence[float]) -> tuple[float, str]:
    """scikit-learn's balanced logistic regression, C by stratified 5-fold cross-validation
    on the training rows (out-of-fold macro-F1, the smallest C of the best): the floor's
    reference (issue 18). Returns (C, the grid's scores)."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    scores = []
    for c in grid:
        classifier = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        predicted = cross_val_predict(classifier, x, list(y), cv=folds)
        scores.append(float(f1_score(list(y), predicted, average="macro")))
    best = int(np.argmax(scores))
    return grid[best], ", ".join(f"C={c:g} {f:.4f}" for c, f in zip(grid, scores, strict=True))


def run_baseline(model_path: str, data: Protocol, max_length: int, by: str = "validation") -> Run:
    """C by validation macro-F1 (the smallest of equals), or (`by="cv"`) by 5-fold
    cross-validation on the training rows over the trainer's probe grid; then one
    prediction of test.csv."""
    started = time.perf_counter()
    train = protocol.read_rows(data.train_path)
    x_train = embed(model_path, [t for t, _ in train], max_length, 64)
    x_validation = embed(model_path, [t for t, _ in data.validation], max_length, 64)
    references = [label for _, label in data.validation]
    if by == "cv":
        from services.trainer.core.probe import PROBE_C_GRID

        c, grid = cv_choice(x_train, [label for _, label in train], PROBE_C_GRID)
        classifier = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
        classifier.fit(x_train, [label for _, label in train])
        f1 = protocol.validation_f1(classifier.predict(x_validation).tolist(), references)
        seconds = time.perf_counter() - started
        x_test = embed(model_path, [t for t, _ in data.test], max_length, 64)
        test = protocol.score_test(classifier.predict(x_test).tolist(), data)
        note = f"C={c:g} chosen by 5-fold CV on training rows ({grid}); deterministic, run once"
        return Run(BASELINE + " C by CV", None, f1, test, seconds, note)
    fitted = []
    for c in C_GRID:
        classifier = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        classifier.fit(x_train, [label for _, label in train])
        f1 = protocol.validation_f1(classifier.predict(x_validation).tolist(), references)
        fitted.append((f1, c, classifier))
    f1, c, classifier = max(fitted, key=lambda fit: fit[0])  # the first (smallest C) of equals
    seconds = time.perf_counter() - started
    x_test = embed(model_path, [t for t, _ in data.test], max_length, 64)
    test = protocol.score_test(classifier.predict(x_test).tolist(), data)
    grid = ", ".join(f"C={fit[1]:g} {fit[0]:.4f}" for fit in fitted)
    edge = ", at the grid's edge" if c in (C_GRID[0], C_GRID[-1]) else ""
    note = f"C={c:g} chosen on validation macro-F1{edge} ({grid}); deterministic, run once"
    return Run(BASELINE, None, f1, test, seconds, note)


# ---- our trainer ---------------------------------------------------------------------------


def job_spec(
    args: argparse.Namespace, name: str, seed: int, out_dir: Path, model_path: str, data: Protocol
) -> JobSpec:
    chosen = dict(CONFIGS[name])
    probe_only = bool(chosen.pop("probe_only", False))
    balancing = {"focal_gamma": 0.0, "use_class_weights": False, **chosen}
    return JobSpec(
        job_id=f"bench-{name}-seed{seed}",
        base_model=model_path,
        dataset=DatasetSpec(
            uri=str(data.train_path),
            task=Task.CLASSIFICATION,
            text_field="text",
            label_field="category",
            validation_uri=str(data.validation_path),
            seed=seed,
        ),
        lora=LoraSpec(rank=args.rank, alpha=2.0 * args.rank, dropout=0.05),
        training=TrainingSpec(
            learning_rate=args.lr,
            num_epochs=args.epochs,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            warmup_ratio=args.warmup_ratio,
            seed=seed,
            probe_only=probe_only,
        ),
        balancing=BalancingSpec(**balancing),
        output_dir=str(out_dir / f"{name}-seed{seed}"),
    )


def loop_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoopOptions:
    """The trainer's loop options with this run's ablation flags applied."""
    changes: dict[str, Any] = {
        "linear_probe": not args.no_probe,
        "cpu_bf16": {"auto": None, "on": True, "off": False}[args.cpu_bf16],
    }
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


def run_lora(runner: LocalRunner, spec: JobSpec, name: str, data: Protocol) -> Run:
    """Trains, keeps the best validation epoch's adapter, reloads it and scores test once."""
    evaluations: list[EvaluationEvent] = []

    def emit(event: Event) -> None:
        if isinstance(event, EvaluationEvent):
            evaluations.append(event)

    prepared = runner.validate(spec)
    completed = runner.run(spec, prepared, RunContext(emit=emit, should_stop=lambda: False))
    curve = [protocol.validation_f1(e.predictions, e.references) for e in evaluations]
    best = curve.index(max(curve))  # the earliest of equals, as the optimizer keeps it
    keep_adapter(Path(completed.artifact_dir), evaluations[best].adapter_dir)
    max_length = spec.training.max_seq_length
    texts = [text for text, _ in data.validation]
    reloaded = protocol.predict_adapter(completed.artifact_dir, texts, max_length, "cpu")
    trained = evaluations[best].predictions
    agree = sum(a == b for a, b in zip(reloaded, trained, strict=True))
    test = protocol.score_adapter(completed.artifact_dir, data, max_length, "cpu")
    note = (
        f"validation macro-F1 per epoch {' '.join(f'{f:.3f}' for f in curve)}, kept epoch "
        f"{best + 1}; reloaded adapter agrees with the trained model on {agree}/{len(trained)}"
    )
    return Run(name, spec.training.seed, curve[best], test, completed.train_seconds, note)


# ---- output --------------------------------------------------------------------------------

COLUMNS = ("val macro-F1", "test macro-F1", "tail F1", "head F1", "accuracy", "train s")


def figures(run: Run) -> tuple[float, ...]:
    t = run.test
    return (run.validation_f1, t.macro_f1, t.tail_f1, t.head_f1, t.accuracy, run.train_seconds)


def print_runs(runs: Sequence[Run]) -> None:
    """One row per run, then mean ± std per configuration over its seeds."""
    width = max(len(r.name) for r in runs) + 8
    print("\nper run (test columns: the selected model, scored once on test.csv)")
    print(f"{'run':<{width}}  " + "  ".join(f"{c:>13}" for c in COLUMNS))
    for run in runs:
        cells = [f"{v:13.4f}" for v in figures(run)[:-1]] + [f"{run.train_seconds:13.1f}"]
        print(f"{run.label:<{width}}  " + "  ".join(cells))
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    print(f"\nmean ± std over seeds {','.join(map(str, seeds))}; {protocol.SEEDS_NOTE}")
    print(f"{'config':<{width}}  " + "  ".join(f"{c:>15}" for c in COLUMNS))
    for name in dict.fromkeys(r.name for r in runs):
        columns = zip(*(figures(r) for r in runs if r.name == name), strict=True)
        means = (
            protocol.mean_std(c, 1 if i == len(COLUMNS) - 1 else 4) for i, c in enumerate(columns)
        )
        print(f"{name:<{width}}  " + "  ".join(f"{m:>15}" for m in means))
    print()
    for r in runs:
        if r.note:
            print(f"{r.label}: {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    protocol.add_arguments(parser)
    parser.add_argument(
        "--model", default="", help="model path or hub name (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--configs",
        default=",".join(_DEFAULT_CONFIGS),
        help=f"comma-separated LoRA configs among {', '.join(CONFIGS)} (empty: baseline only)",
    )
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--baseline-c",
        choices=("validation", "cv"),
        default="validation",
        help="how the baseline's C is chosen: on the validation split (a careful user with a "
        "validation set), or by 5-fold cross-validation on the training rows over the "
        "trainer's probe grid (the reference of the floor: the probe-only trial)",
    )
    parser.add_argument(
        "--data",
        choices=("banking77", "payments"),
        default="banking77",
        help="payments: `make demo`'s payment comments with held-out splits "
        "(bench/payments_protocol.py) instead of banking77-LT",
    )
    parser.add_argument(
        "--seeds",
        type=protocol.parse_seeds,
        default=[1, 2, 3],
        help="training seeds, each configuration runs once per seed (default 1,2,3)",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup-ratio", type=float, default=0.0)
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
        "--cpu-bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bfloat16 autocast on the CPU (LORATUNE_TRAINER_CPU_BF16; auto = where the CPU "
        "has it natively, as the trainer ships)",
    )
    parser.add_argument(
        "--base-dropout",
        type=float,
        default=None,
        help="ablation: set every dropout of the loaded base model (not LoRA's) to this",
    )
    args = parser.parse_args()
    names = [c for c in args.configs.split(",") if c]
    for name in names:
        if name not in CONFIGS:
            parser.error(f"unknown config {name!r}")
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
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="banking77-bench-") as out:
        if args.data == "payments":
            import payments_protocol

            data = payments_protocol.prepare(Path(out) / "data")
        else:
            data = protocol.prepare(Path(out) / "data", protocol.options_from(args))
        print(f"{data.describe()}; model {args.model or 'all-MiniLM-L6-v2 (packaged)'}")
        print(
            f"LoRA budget: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
            f"rank {args.rank}, max_seq_length {args.max_seq_length}, seeds "
            f"{','.join(map(str, args.seeds))}, {args.threads} threads; pooling {args.pooling}; "
            + (
                f"linear probe, then head lr {args.lr:g}"
                if options.linear_probe
                else f"no probe, head lr {loop.head_learning_rate(args.lr, options):g}"
            )
            + f"; head alone for {options.head_only_fraction:g} of the steps"
        )
        if not args.no_baseline:
            runs.append(run_baseline(model_path, data, args.max_seq_length, args.baseline_c))
            print(f"done: {runs[-1].summary()}", flush=True)
        runner = LocalRunner(device="cpu", options=options)
        for seed in args.seeds:
            for name in names:
                spec = job_spec(args, name, seed, Path(out), model_path, data)
                runs.append(run_lora(runner, spec, name, data))
                print(f"done: {runs[-1].summary()}", flush=True)
        runner.release()
    if runs:
        print_runs(runs)


if __name__ == "__main__":
    main()
