"""Benchmark: ten trials' BERTScore through the evaluator service vs ten `bert_score.score` calls.

Like a study: ten evaluations of 1,000 generated texts against the same 1,000
references. Ours goes through the running gRPC service (long-lived model, reference
embeddings cached); the alternative is what a user would write, `bert_score.score`
on the same model and layer. Prints both times, the ratio, and the largest difference
between the two scores.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/evaluator_bertscore.py [--n 1000] [--trials 10]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import time
from pathlib import Path

import bert_score
import grpc

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.config import CommonSettings
from services.common.server import start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.main import build_evaluator, service_definition

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77" / "test.csv"


def references(n: int) -> list[str]:
    """Real customer queries (banking77 test split) as references."""
    with DATA.open(encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return texts[:n]


def generations(refs: list[str], trial: int) -> list[str]:
    """A trial's "model outputs": each reference with words dropped, swapped or added."""
    rng = random.Random(trial)
    filler = ["please", "my", "card", "account", "the", "help", "now", "money", "why"]
    out = []
    for ref in refs:
        words = ref.split()
        words = [w for w in words if rng.random() > 0.15] or words[:1]
        if len(words) > 2 and rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(filler))
        out.append(" ".join(words))
    return out


async def run_service(
    model: str, layers: int, refs: list[str], trials: list[list[str]]
) -> tuple[float, list[float]]:
    """Seconds for all trials through the service, and each trial's F1."""
    # bert_score.score does not rescale: neither does the service here.
    settings = EvaluatorSettings(
        bertscore_model=model, bertscore_layers=layers, bertscore_rescale="none"
    )
    evaluator = build_evaluator(settings)
    server = await start_server(
        [service_definition(evaluator)],
        CommonSettings(),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
            # The model loads on the first generation request; a service has it loaded
            # before the study's trials arrive, so warm it up outside the timing.
            await stub.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    task_type=common_pb2.TASK_TYPE_GENERATION,
                    predictions=["warm"],
                    references=["up"],
                )
            )
            f1s = []
            started = time.perf_counter()
            for preds in trials:
                response = await stub.Evaluate(
                    evaluator_pb2.EvaluateRequest(
                        task_type=common_pb2.TASK_TYPE_GENERATION,
                        predictions=preds,
                        references=refs,
                    ),
                    timeout=600,
                )
                f1s.append(response.result.bertscore.f1)
            return time.perf_counter() - started, f1s
    finally:
        await server.stop(1.0)


def run_library(
    model: str, layers: int, refs: list[str], trials: list[list[str]]
) -> tuple[float, list[float]]:
    """Seconds for all trials with `bert_score.score`, and each trial's F1."""
    f1s = []
    started = time.perf_counter()
    for preds in trials:
        _, _, f1 = bert_score.score(preds, refs, model_type=model, num_layers=layers, batch_size=64)
        f1s.append(float(f1.mean()))
    return time.perf_counter() - started, f1s


def _spin() -> None:
    """A neighbour that keeps one core busy."""
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="texts per evaluation")
    parser.add_argument("--trials", type=int, default=10, help="evaluations (trials)")
    parser.add_argument(
        "--model", default="", help="model path or hub name (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for both sides; 0 = what the services choose "
        "(services.common.threads: OMP_NUM_THREADS, else affinity capped by the cgroup quota)",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="start this many busy-looping processes first: contention, as from a "
        "neighbour on the node",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import multiprocessing

    import torch

    from services.common.threads import configure_torch_threads

    configure_torch_threads(args.threads)
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for process in busy:
        process.start()
    print(f"torch threads {torch.get_num_threads()}, {args.busy} busy neighbour process(es)")
    model = args.model or packaged_minilm_path()
    refs = references(args.n)
    trials = [generations(refs, t) for t in range(args.trials)]
    print(
        f"{args.trials} evaluations x {len(refs)} pairs, "
        f"model {Path(model).name}, layer {args.layers}"
    )

    ours, ours_f1 = asyncio.run(run_service(model, args.layers, refs, trials))
    print(f"loratune evaluator (gRPC service): {ours:8.2f} s")
    theirs, lib_f1 = run_library(model, args.layers, refs, trials)
    print(f"bert_score.score ({len(trials)} calls)       : {theirs:8.2f} s")
    diff = max(abs(a - b) for a, b in zip(ours_f1, lib_f1, strict=True))
    print(f"speed-up: {theirs / ours:.2f}x   max |F1 difference| = {diff:.2e}")
    for process in busy:
        process.terminate()


if __name__ == "__main__":
    main()
