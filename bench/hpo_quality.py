"""Benchmark: TPE with pruning against random search without pruning, the same trial budget.

Follows the protocol of `longtail_protocol.py`: every trial trains on
`train_longtail.csv` (less the 10 rows held out for validation) and is scored, for the
sampler and the pruner, on the 770-row validation split drawn from the unused rows of
`train.csv` (`CreateStudyRequest.dataset.validation_uri`); test.csv is never seen by a
search. After each study its best trial's adapter (`Study.best_model_dir`, the best
trial's kept epoch) is reloaded with `load_adapter_for_inference` and scored once on
the full `test.csv`: macro-F1, tail F1 (65 intents with <= 20 training rows), head F1,
accuracy.

Both searches run the same number of trials on the same trainer, base model and search
space. Per search and seed it prints the best validation objective, the test scores,
the trial seconds spent (pruned trials stop early, which is where pruning saves time)
and the cumulative trial seconds until the best validation objective first reached
`--target`; with several `--seeds` (the study's sampler and training seed) also
mean ± std. The best-so-far validation objective against cumulative trial seconds goes
to `<out>_<search>.csv` (one per search, so two processes can write side by side) and
`<out>.png`, drawn from every search's CSV of the same settings.

Each search runs its own trainer, evaluator and optimizer in this process with
`--threads` torch threads. `--only NAME` runs one search, so the two can run side by
side as two processes on a machine with a core for each; `--plot-only` redraws the PNG
from the CSVs afterwards.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hpo_quality.py [--trials 8] [--epochs 2]
        [--seeds 1,2,3] [--target 0.85] [--only tpe-pruned|random] [--threads 1]
        [--out bench/hpo_quality_curve] [--plot-only]
        [--limit-train N --limit-test N: smoke tests only]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import longtail_protocol as protocol  # noqa: E402
from longtail_protocol import Protocol, TestScore  # noqa: E402

from loratune.common.v1 import common_pb2  # noqa: E402
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc  # noqa: E402
from services.common.client import ClientSettings  # noqa: E402
from services.common.config import CommonSettings  # noqa: E402
from services.common.defaults import TrainingDefaults  # noqa: E402
from services.common.server import start_server  # noqa: E402
from services.evaluator.config import EvaluatorSettings  # noqa: E402
from services.evaluator.core.bertscore import packaged_minilm_path  # noqa: E402
from services.evaluator.main import build_evaluator  # noqa: E402
from services.evaluator.main import service_definition as evaluator_definition  # noqa: E402
from services.optimizer.config import OptimizerSettings  # noqa: E402
from services.optimizer.main import build_optimizer  # noqa: E402
from services.optimizer.main import service_definition as optimizer_definition  # noqa: E402
from services.trainer.config import TrainerSettings  # noqa: E402
from services.trainer.main import build_manager  # noqa: E402
from services.trainer.main import service_definition as trainer_definition  # noqa: E402

MAX_SEQ_LENGTH = 48
CURVE_FIELDS = (
    "search",
    "seed",
    "trial",
    "state",
    "trial_seconds",
    "cumulative_seconds",
    "objective",
    "best_so_far",
    "trials",
    "epochs",
    "train_rows",
)


@dataclass(frozen=True)
class Search:
    """One side of the comparison."""

    name: str
    sampler: str
    pruner: str


SEARCHES = (Search("tpe-pruned", "tpe", "median"), Search("random", "random", "none"))


@dataclass(frozen=True)
class TrialPoint:
    """A finished trial, in the order trials finished."""

    number: int
    state: str
    seconds: float
    objective: float | None  # validation objective (a pruned trial's: its last epoch's)


@dataclass(frozen=True)
class Outcome:
    """One study: its trials, its best trial's validation objective and adapter folder."""

    search: str
    seed: int
    trials: tuple[TrialPoint, ...]
    best_objective: float
    best_trial: int
    best_dir: str
    wall_seconds: float
    # The study as the optimizer ended it (its report), and every trial's folder.
    study: optimizer_pb2.Study | None = None
    trial_dirs: dict[int, str] | None = None

    def curve(self) -> list[tuple[TrialPoint, float, float]]:
        """(trial, cumulative trial seconds, best validation objective so far) per trial."""
        rows = []
        spent, best = 0.0, math.nan  # nan until a trial completes
        for trial in self.trials:
            spent += trial.seconds
            # A pruned trial's last value is on record, but only a complete one is selectable.
            value = trial.objective if trial.state == "COMPLETE" else None
            if value is not None and (math.isnan(best) or value > best):
                best = value
            rows.append((trial, spent, best))
        return rows

    def seconds_to(self, target: float) -> float | None:
        """Cumulative trial seconds when the best validation objective first reached `target`."""
        return next((spent for _, spent, best in self.curve() if best >= target), None)

    @property
    def trial_seconds(self) -> float:
        return sum(t.seconds for t in self.trials)

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.trials)


@dataclass(frozen=True)
class Scored:
    """A study's outcome and its best adapter's one test score."""

    outcome: Outcome
    test: TestScore
    reloaded_validation_f1: float  # the reloaded best adapter on the validation split


async def run_study(
    search: Search, seed: int, args: argparse.Namespace, data: Protocol, root: Path
) -> Outcome:
    """Runs one study on its own trainer, evaluator and optimizer; returns its trials."""
    started = time.perf_counter()
    common = CommonSettings()
    trainer_settings = TrainerSettings(artifact_root=root / "runs")
    trainer = await start_server(
        [trainer_definition(build_manager(trainer_settings), trainer_settings, TrainingDefaults())],
        common,
        host="127.0.0.1",
        metrics_port=None,
    )
    evaluator = await start_server(
        [evaluator_definition(build_evaluator(EvaluatorSettings()))],
        common,
        host="127.0.0.1",
        metrics_port=None,
    )
    optimizer, channels = build_optimizer(
        OptimizerSettings(
            trainers=trainer.address,
            evaluator_address=evaluator.address,
            artifact_root=root / "runs",
            poll_seconds=0.5,
        ),
        TrainingDefaults(),
        ClientSettings(),
    )
    server = await start_server(
        [optimizer_definition(optimizer, channels)], common, host="127.0.0.1", metrics_port=None
    )
    study_id = f"{search.name}-seed{seed}"
    bases = list(getattr(args, "base_models", None) or [packaged_minilm_path()])
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            request = optimizer_pb2.CreateStudyRequest(
                study_name=study_id,
                fine_tuning_params=optimizer_pb2.FineTuningParams(
                    base_model_name=bases[0],
                    base_model_names=bases[1:],
                    n_trials=args.trials,
                    time_budget_seconds=getattr(args, "time_budget", 0) or 0,
                ),
                dataset=common_pb2.DatasetSpec(
                    uri=str(data.train_path),
                    label_field="category",
                    validation_uri=str(data.validation_path),
                    task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                    seed=seed,  # the sampler's seed, and every trial's training seed
                ),
                # --default-space: the optimizer's documented classification space, as a
                # user who sets nothing gets it; otherwise the bench's cut-down one.
                search_space=optimizer_pb2.SearchSpace()
                if args.default_space
                else optimizer_pb2.SearchSpace(num_epochs=[args.epochs], rank=[8, 16]),
                training=common_pb2.TrainingParams(
                    batch_size=32, max_seq_length=getattr(args, "max_seq_length", MAX_SEQ_LENGTH)
                ),
                sampler=search.sampler,
                pruner=search.pruner,
                max_parallel_trials=1,
            )
            await stub.CreateStudy(request)
            async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id=study_id)):
                if event.HasField("trial_finished"):
                    t = event.trial_finished.trial
                    state = optimizer_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_")
                    value = f"{t.objective:.4f}" if t.HasField("objective") else "-"
                    print(
                        f"  {study_id}: trial {t.number} {state} validation macro-F1 {value}",
                        flush=True,
                    )
            study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_id))).study
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id=study_id))
            ).trials
    finally:
        await server.stop(1)
        await trainer.stop(1)
        await evaluator.stop(1)
    if study.state != optimizer_pb2.STUDY_STATE_COMPLETED or not study.HasField("best_trial"):
        raise RuntimeError(f"study {study_id} ended {study.state} {study.failure_reason}")
    finished = sorted(
        (t for t in trials if t.end_time.seconds), key=lambda t: t.end_time.ToNanoseconds()
    )
    points = tuple(
        TrialPoint(
            number=t.number,
            state=optimizer_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_"),
            seconds=(t.end_time.ToDatetime() - t.start_time.ToDatetime()).total_seconds(),
            objective=t.objective if t.HasField("objective") else None,
        )
        for t in finished
    )
    return Outcome(
        search=search.name,
        seed=seed,
        trials=points,
        best_objective=study.best_trial.objective,
        best_trial=study.best_trial.number,
        best_dir=study.best_model_dir or study.best_trial.artifact_dir,
        wall_seconds=time.perf_counter() - started,
        study=study,
        trial_dirs={t.number: t.artifact_dir for t in trials},
    )


def score(outcome: Outcome, data: Protocol) -> Scored:
    """The study's best adapter, reloaded: once on test.csv, and on validation as a check."""
    texts = [text for text, _ in data.validation]
    predictions = protocol.predict_adapter(outcome.best_dir, texts, MAX_SEQ_LENGTH)
    references = [label for _, label in data.validation]
    return Scored(
        outcome=outcome,
        test=protocol.score_adapter(outcome.best_dir, data, MAX_SEQ_LENGTH),
        reloaded_validation_f1=protocol.validation_f1(predictions, references),
    )


# ---- the curve: CSV and plot ---------------------------------------------------------------


def curve_path(out: Path, search: str) -> Path:
    return out.with_name(f"{out.name}_{search}.csv")


def write_curve(
    out: Path, search: str, outcomes: Sequence[Outcome], settings: dict[str, int]
) -> Path:
    """Every trial of `search`'s studies with the cumulative seconds and the best so far."""
    path = curve_path(out, search)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        for outcome in outcomes:
            for trial, spent, best in outcome.curve():
                writer.writerow(
                    {
                        "search": search,
                        "seed": outcome.seed,
                        "trial": trial.number,
                        "state": trial.state,
                        "trial_seconds": f"{trial.seconds:.1f}",
                        "cumulative_seconds": f"{spent:.1f}",
                        "objective": "" if trial.objective is None else f"{trial.objective:.4f}",
                        "best_so_far": "" if math.isnan(best) else f"{best:.4f}",
                        **settings,
                    }
                )
    return path


def plot(out: Path, target: float, settings: dict[str, int]) -> Path | None:
    """Best-so-far validation objective against cumulative trial seconds, every search's CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = []
    for search, colour in zip(SEARCHES, ("tab:blue", "tab:orange"), strict=True):
        path = curve_path(out, search.name)
        if not path.is_file():
            continue
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or any(rows[0][key] != str(value) for key, value in settings.items()):
            print(f"{path}: other settings than this run's, left out of the plot")
            continue
        drawn.append(path.name)
        for seed in dict.fromkeys(row["seed"] for row in rows):
            points = [r for r in rows if r["seed"] == seed and r["best_so_far"]]
            ax.step(
                [float(r["cumulative_seconds"]) for r in points],
                [float(r["best_so_far"]) for r in points],
                where="post",
                color=colour,
                label=f"{search.name} seed {seed}",
            )
            pruned = [r for r in points if r["state"] == "PRUNED"]
            ax.plot(
                [float(r["cumulative_seconds"]) for r in pruned],
                [float(r["best_so_far"]) for r in pruned],
                "x",
                color=colour,
            )
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("cumulative trial seconds")
    ax.set_ylabel("best validation macro-F1 so far")
    ax.set_title(
        f"banking77 long tail: {settings['trials']} trials "
        + (
            f"of {settings['epochs']} epochs"
            if settings["epochs"]
            else "in the default space (epochs searched)"
        )
        + " (x: a pruned trial)"
    )
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    path = out.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot {path} from {', '.join(drawn)}")
    return path


# ---- output --------------------------------------------------------------------------------


def print_table(results: Sequence[Scored], args: argparse.Namespace, data: Protocol) -> None:
    """One row per study, then mean ± std per search over the seeds."""
    print(
        f"\n{args.trials} trials each, all-MiniLM-L6-v2, banking77 long tail; selection on the "
        f"{len(data.validation)}-row validation split, the best trial's adapter scored once on "
        f"{len(data.test)} test rows; target {args.target:g} (validation)"
    )
    header = (
        f"{'search':<12} {'seed':>4} {'val obj':>8} {'test F1':>8} {'tail':>7} {'head':>7}"
        f" {'acc':>7} {'trial s':>8} {'to target s':>11} {'complete':>8} {'pruned':>6}"
        f" {'wall s':>7}"
    )
    print(header)
    for r in results:
        o, t = r.outcome, r.test
        to_target = o.seconds_to(args.target)
        print(
            f"{o.search:<12} {o.seed:>4} {o.best_objective:>8.4f} {t.macro_f1:>8.4f}"
            f" {t.tail_f1:>7.4f} {t.head_f1:>7.4f} {t.accuracy:>7.4f} {o.trial_seconds:>8.0f}"
            f" {'-' if to_target is None else f'{to_target:.0f}':>11} {o.count('COMPLETE'):>8}"
            f" {o.count('PRUNED'):>6} {o.wall_seconds:>7.0f}"
        )
    for r in results:
        o = r.outcome
        print(
            f"{o.search} seed {o.seed}: best trial {o.best_trial}, validation macro-F1 "
            f"{o.best_objective:.4f} (its adapter reloaded: {r.reloaded_validation_f1:.4f})"
        )
    seeds = sorted({r.outcome.seed for r in results})
    if len(seeds) < 2:
        print(f"one seed: {protocol.SEEDS_NOTE}")
        return
    print(f"\nmean ± std over seeds {','.join(map(str, seeds))}; {protocol.SEEDS_NOTE}")
    for name in dict.fromkeys(r.outcome.search for r in results):
        group = [r for r in results if r.outcome.search == name]
        times = [r.outcome.seconds_to(args.target) for r in group]
        reached = [s for s in times if s is not None]
        print(
            f"{name:<12} val {protocol.mean_std([r.outcome.best_objective for r in group])}"
            f"  test F1 {protocol.mean_std([r.test.macro_f1 for r in group])}"
            f"  tail {protocol.mean_std([r.test.tail_f1 for r in group])}"
            f"  head {protocol.mean_std([r.test.head_f1 for r in group])}"
            f"  acc {protocol.mean_std([r.test.accuracy for r in group])}"
            f"  trial s {protocol.mean_std([r.outcome.trial_seconds for r in group], 0)}"
            f"  to target s {protocol.mean_std(reached, 0) if reached else '-'}"
            f" (reached in {len(reached)} of {len(group)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    protocol.add_arguments(parser)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--default-space",
        action="store_true",
        help="search the default classification space (--epochs is then ignored)",
    )
    parser.add_argument(
        "--seeds", type=protocol.parse_seeds, default=[11], help="study seeds (default 11)"
    )
    parser.add_argument("--target", type=float, default=0.85, help="validation macro-F1 target")
    parser.add_argument("--only", choices=[s.name for s in SEARCHES], default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "hpo_quality_curve",
        help="prefix of the curve CSVs (<out>_<search>.csv) and the plot (<out>.png)",
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw <out>.png from the CSVs, run nothing"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    results: list[Scored] = []
    with tempfile.TemporaryDirectory(prefix="hpo-quality-") as tmp:
        data = protocol.prepare(Path(tmp) / "data", protocol.options_from(args))
        # epochs 0: the default space searches them (--epochs is ignored).
        epochs = 0 if args.default_space else args.epochs
        settings = {"trials": args.trials, "epochs": epochs, "train_rows": data.train_rows}
        if args.plot_only:
            plot(args.out, args.target, settings)
            return
        print(data.describe())
        for search in SEARCHES:
            if args.only is not None and search.name != args.only:
                continue
            outcomes = []
            for seed in args.seeds:
                root = Path(tmp) / f"{search.name}-seed{seed}"
                outcome = asyncio.run(run_study(search, seed, args, data, root))
                outcomes.append(outcome)
                results.append(score(outcome, data))  # before the temporary folder goes
            print(f"curve: {write_curve(args.out, search.name, outcomes, settings)}")
    plot(args.out, args.target, settings)
    print_table(results, args, data)


if __name__ == "__main__":
    main()
