"""Benchmark: what the default classification study buys on banking77-LT, scored honestly.

The default search (the optimizer's documented classification space, TPE with the median
pruner, `--trials` trials, batch 32) runs through the real services on the long-tail
protocol of `longtail_protocol.py`: training on `train_longtail.csv`, every selection on
a validation split of 10 rows per intent drawn from the unused rows of `train.csv` with
`--split-seed` (use one you did not design on), test.csv never seen by the study. Per
study seed it prints, from the study's own report (Study.report): the floor (the
probe-only trial), the default trial and the selected trial (best on validation) with
their validation macro-F1, the noise of the selection and its expected optimism, the
trial published; then one test score each for the floor and the selected trial (the
published one is one of them), the optimism (selected validation minus its test) and the
study's seconds. Then scikit-learn's balanced logistic regression on the same frozen
features with its C by 5-fold cross-validation on the training rows, once.

test.csv is read 2 times per seed (floor, selected), a third when the study published an
ensemble (each base's best trial and the floors), and once per base for the baseline.
`study_rereport.py` scores what the current rule publishes for a study that already ran.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/study_report.py --seeds 11 --split-seed 7
        [--trials 20] [--threads 1] [--max-seq-length 64] [--no-baseline]
        [--base-model PATH ...] [--time-budget 90m]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import hpo_quality  # noqa: E402
import longtail_protocol as protocol  # noqa: E402

from services.common.durations import parse_duration  # noqa: E402
from services.evaluator.core.bertscore import packaged_minilm_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    protocol.add_arguments(parser)
    parser.add_argument("--seeds", type=protocol.parse_seeds, default=[11])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument(
        "--base-model",
        dest="base_models",
        action="append",
        default=None,
        help="a base model of the study, repeated for several (default: the packaged "
        "all-MiniLM-L6-v2); `make models` puts all-mpnet-base-v2 in models/",
    )
    parser.add_argument(
        "--time-budget",
        type=parse_duration,
        default=0,
        help="the study's time budget (90m, 1h30m; default none: --trials decides)",
    )
    args = parser.parse_args()
    args.default_space = True
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="study-report-"))
    data = protocol.prepare(workdir, protocol.options_from(args))
    print(data.describe(), flush=True)
    search = hpo_quality.SEARCHES[0]  # TPE + median pruner: the default
    rows = []
    for seed in args.seeds:
        started = time.perf_counter()
        outcome = asyncio.run(hpo_quality.run_study(search, seed, args, data, workdir / str(seed)))
        seconds = time.perf_counter() - started
        study, dirs = outcome.study, outcome.trial_dirs or {}
        assert study is not None and study.HasField("report"), "the study has no report"
        r = study.report
        length = args.max_seq_length
        selected_test = protocol.score_adapter(dirs[r.selected_trial], data, length)
        floor_test = (
            protocol.score_adapter(dirs[r.floor_trial], data, length)
            if r.HasField("floor_trial") and r.floor_trial != r.selected_trial
            else selected_test
        )
        if r.ensemble_published:
            # The published folder: each base's best trial and the floors together.
            published_test = protocol.score_adapter(study.best_model_dir, data, length)
        elif r.published_trial == r.floor_trial:
            published_test = floor_test
        else:
            published_test = selected_test
        rows.append((seed, r, floor_test, selected_test, published_test, seconds, study))
        print(f"seed {seed} done in {seconds:.0f} s: {r}", flush=True)
    print(
        "\nseed | floor val/test | default val | selected # val/test | optimism | noise, exp. "
        "optimism (candidates) | published # test (tail, head) | trials (ran, reused) | seconds"
    )
    for seed, r, floor, selected, published, seconds, study in rows:
        print(
            f"{seed} | {r.floor_objective:.4f} / {floor.macro_f1:.4f} | "
            f"{r.default_objective:.4f} | #{r.selected_trial} {r.selected_objective:.4f} / "
            f"{selected.macro_f1:.4f} | {r.selected_objective - selected.macro_f1:+.4f} | "
            f"{r.noise:.4f}, {r.expected_optimism:.4f} ({r.candidates}) | #{r.published_trial} "
            f"{published.macro_f1:.4f} ({published.tail_f1:.4f}, {published.head_f1:.4f}) | "
            f"{study.trials_complete + study.trials_pruned} ran, {study.trials_reused} reused | "
            f"{seconds:.0f}"
        )
        for floor in r.floors if len(r.floors) > 1 else ():
            print(f"  floor of {floor.base_model}: #{floor.trial} {floor.objective:.4f}")
        if r.ensemble_trials:
            print(
                f"  ensemble of {', '.join(f'#{n}' for n in r.ensemble_trials)}: validation "
                f"macro-F1 {r.ensemble_objective:.4f} (selected {r.selected_macro_f1:.4f}); "
                f"cross-validated {r.ensemble_cross_validated:.4f} against the single "
                f"model's {r.single_cross_validated:.4f}: "
                f"{'published' if r.ensemble_published else 'not published'}"
            )
        if r.warning:
            print(f"  {r.warning}")
    if not args.no_baseline:
        from banking77_longtail import run_baseline

        for base in args.base_models or [str(packaged_minilm_path())]:
            baseline = run_baseline(base, data, args.max_seq_length, "cv")
            print(f"\n{base}: {baseline.summary()}\n{baseline.note}")


if __name__ == "__main__":
    main()
