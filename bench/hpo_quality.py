"""Benchmark: TPE with pruning against random search without pruning, the same trial budget.

On ../shared/data/banking77/train_longtail.csv (77 intents, long-tailed), every trial is
scored on the full test.csv (as the validation file) by macro-F1. Both searches run the
same number of trials on the same trainer, base model and search space; the table shows
the best macro-F1 each found and the total training time it spent (pruned trials stop
early, which is where TPE + pruning saves time).

Each search runs its own trainer, evaluator and optimizer in this process with
`--threads` torch threads. `--only NAME` runs one search, so the two can run side by
side as two processes on a machine with a core for each (the printed rows then combine
into the table).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hpo_quality.py [--trials 8] [--epochs 2]
        [--only tpe-pruned|random] [--threads 1]
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

import grpc  # noqa: E402

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

DATA = ROOT.parent / "shared" / "data" / "banking77"
# name, sampler, pruner
SEARCHES = (("tpe-pruned", "tpe", "median"), ("random", "random", "none"))


async def search(
    name: str, sampler: str, pruner: str, args: argparse.Namespace, root: Path
) -> tuple[float, float, int, int]:
    """Runs one study; returns (best macro-F1, training seconds, complete, pruned)."""
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
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            request = optimizer_pb2.CreateStudyRequest(
                study_name=name,
                fine_tuning_params=optimizer_pb2.FineTuningParams(
                    base_model_name=packaged_minilm_path(), n_trials=args.trials
                ),
                dataset=common_pb2.DatasetSpec(
                    uri=str(DATA / "train_longtail.csv"),
                    label_field="category",
                    validation_uri=str(DATA / "test.csv"),
                    task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                    seed=11,
                ),
                search_space=optimizer_pb2.SearchSpace(num_epochs=[args.epochs], rank=[8, 16]),
                training=common_pb2.TrainingParams(batch_size=32, max_seq_length=48),
                sampler=sampler,
                pruner=pruner,
                max_parallel_trials=1,
            )
            await stub.CreateStudy(request)
            async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id=name)):
                if event.HasField("trial_finished"):
                    t = event.trial_finished.trial
                    state = optimizer_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_")
                    value = f"{t.objective:.4f}" if t.HasField("objective") else "-"
                    print(f"  {name}: trial {t.number} {state} macro-F1 {value}", flush=True)
            trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id=name))).trials
    finally:
        await server.stop(1)
        await trainer.stop(1)
        await evaluator.stop(1)
    best = max((t.objective for t in trials if t.HasField("objective")), default=0.0)
    seconds = sum(
        (t.end_time.ToDatetime() - t.start_time.ToDatetime()).total_seconds()
        for t in trials
        if t.end_time.seconds
    )
    complete = sum(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials)
    pruned = sum(t.state == optimizer_pb2.TRIAL_STATE_PRUNED for t in trials)
    return best, seconds, complete, pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", choices=[name for name, _, _ in SEARCHES], default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sampler, pruner in SEARCHES:
            if args.only is not None and name != args.only:
                continue
            started = time.perf_counter()
            best, seconds, complete, pruned = asyncio.run(
                search(name, sampler, pruner, args, Path(tmp) / name)
            )
            rows.append((name, best, seconds, complete, pruned, time.perf_counter() - started))
    print(f"\n{args.trials} trials each, all-MiniLM-L6-v2, banking77 long-tail -> test.csv")
    print(
        f"{'search':<12} {'best macro-F1':>13} {'train s':>9} {'complete':>9} {'pruned':>7}"
        f" {'wall s':>8}"
    )
    for name, best, seconds, complete, pruned, wall in rows:
        print(f"{name:<12} {best:>13.4f} {seconds:>9.0f} {complete:>9} {pruned:>7} {wall:>8.0f}")


if __name__ == "__main__":
    main()
