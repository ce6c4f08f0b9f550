"""Benchmark: the same study with one trainer and with two; wall time of each and the ratio.

The optimizer sends a study's trials to every idle trainer at once (up to
`max_parallel_trials`), so with two trainers a study of equal trials should take about
half the time. Both sides run the same study: the same seed, the same dataset, six trials
of a tiny job (the 2-layer Qwen3 of the tests, built here, classification, one epoch),
the random sampler (so both draw the same parameters whatever order trials finish in),
no pruner (so every trial trains fully), and a search space that varies only what does
not change a job's cost (learning rate, dropout, alpha, rsLoRA, balancing).

Trainers run as separate `loratune serve trainer` processes, one torch thread each
(`OMP_NUM_THREADS=1`), as in a cluster where each trainer has its own accelerator. Not
in-process: two trainers in one process would share its GIL, and a tiny model's step is
mostly Python and dispatch overhead that holds it, so threads cannot run two jobs at twice
the speed; and torch's thread count is per process. The optimizer and the evaluator run in
this process, each its own gRPC server on loopback, as `loratune up` runs them. Fresh
trainer processes and fresh SQLite storage for every study; the wall time runs from
CreateStudy to the study's finished event, so each trainer's first load of the base model
is counted, as it is in a real study.

On a machine with fewer free cores than trainers the ratio is bounded by the cores: the
load average is printed beside the times.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/study_parallel.py [--trials 6] [--rows 600]
        [--epochs 1] [--threads 1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings, create_channel, wait_for_ready
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.logging import configure_logging
from services.common.server import RunningServer, start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.main import build_evaluator
from services.evaluator.main import service_definition as evaluator_definition
from services.optimizer.config import OptimizerSettings
from services.optimizer.main import build_optimizer
from services.optimizer.main import service_definition as optimizer_definition

REPO = Path(__file__).resolve().parents[1]
TRAINER = "loratune.trainer.v1.TrainerService"


@dataclass(frozen=True)
class Outcome:
    """One study's result."""

    trainers: int
    seconds: float
    state: str
    finished: int
    per_trainer: dict[str, int]
    best: float
    most_at_once: int
    trainer_cpu: float
    others_cores: float | None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per study (>= 5)")
    parser.add_argument("--rows", type=int, default=600, help="training rows of the dataset")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trainer")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of studies, alternated")
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args()


def system_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc), 0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def most_at_once(trials: list[optimizer_pb2.Trial]) -> int:
    """The largest number of trials that ran at the same moment."""
    edges = []
    for t in trials:
        if t.HasField("start_time") and t.HasField("end_time"):
            edges += [(t.start_time.ToNanoseconds(), 1), (t.end_time.ToNanoseconds(), -1)]
    running = peak = 0
    for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_dataset(path: Path, rows: int) -> Path:
    words = ["good", "great", "fine", "bad", "awful", "okay"]
    labels = ["pos", "pos", "pos", "neg", "neg", "neutral"]
    lines = []
    for i in range(rows):
        k = i % len(words)
        text = f"w{i % 11} w{(i * 7) % 13} {words[k]} w{i % 5} w{(i * 3) % 17} the w{i % 9}"
        lines.append(json.dumps({"text": text, "label": labels[k]}) + "\n")
    path.write_text("".join(lines))
    return path


def start_trainer(port: int, root: Path, threads: int) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        LORATUNE_ARTIFACT_ROOT=str(root),
        LORATUNE_LOG_LEVEL="WARNING",
        LORATUNE_TRAINER_PROGRESS_EVERY_STEPS="20",
    )
    command = [sys.executable, "-m", "services.cli.main", "serve", "trainer"]
    return subprocess.Popen(
        [*command, "--port", str(port), "--metrics-port", "-1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def study_request(
    dataset: Path, model: Path, trials: int, epochs: int, seed: int
) -> optimizer_pb2.CreateStudyRequest:
    return optimizer_pb2.CreateStudyRequest(
        project_id=1,
        study_name="parallel",
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name=str(model), n_trials=trials
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(dataset),
            task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
            validation_fraction=0.1,
            seed=seed,
        ),
        # One rank, one epoch count, one module set: every trial costs the same.
        search_space=optimizer_pb2.SearchSpace(
            rank=[8],
            num_epochs=[epochs],
            target_modules=[optimizer_pb2.TargetModulesChoice(name="all-linear")],
            learning_rate=optimizer_pb2.FloatRange(low=1e-3, high=1e-2, log=True),
        ),
        training=common_pb2.TrainingParams(batch_size=8, max_seq_length=16),
        sampler="random",
        pruner="none",
    )


async def run_study(
    n_trainers: int, work: Path, request: optimizer_pb2.CreateStudyRequest, threads: int
) -> Outcome:
    """Fresh trainers and storage; times CreateStudy -> study finished."""
    root = work / f"runs-{n_trainers}-{time.monotonic_ns()}"
    ports = [free_port() for _ in range(n_trainers)]
    procs = [start_trainer(port, root, threads) for port in ports]
    servers: list[RunningServer] = []
    try:
        addresses = [f"127.0.0.1:{port}" for port in ports]
        for address in addresses:
            async with create_channel(address) as channel:
                await wait_for_ready(channel, TRAINER, timeout=120)
        common = CommonSettings(reflection=False, auth_token=None)
        evaluator = await start_server(
            [evaluator_definition(build_evaluator(EvaluatorSettings()))],
            common,
            host="127.0.0.1",
            metrics_port=None,
        )
        servers.append(evaluator)
        settings = OptimizerSettings(
            trainers=",".join(addresses),
            evaluator_address=evaluator.address,
            artifact_root=root,
            poll_seconds=0.2,
        )
        optimizer, channels = build_optimizer(settings, TrainingDefaults(), ClientSettings())
        server = await start_server(
            [optimizer_definition(optimizer, channels)],
            common,
            host="127.0.0.1",
            metrics_port=None,
        )
        servers.insert(0, server)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            busy_before = system_busy_seconds()
            trainer_before = sum(process_cpu_seconds(p.pid) for p in procs)
            ours_before = time.process_time() + trainer_before
            started = time.perf_counter()
            await stub.CreateStudy(request)
            final = None
            async for event in stub.WatchStudy(
                optimizer_pb2.WatchStudyRequest(study_id=request.study_name), timeout=3600
            ):
                if event.WhichOneof("event") == "study_finished":
                    final = event.study_finished.study
                    break
            seconds = time.perf_counter() - started
            trainer_total = sum(process_cpu_seconds(p.pid) for p in procs)
            trainer_cpu = trainer_total - trainer_before
            ours = time.process_time() + trainer_total - ours_before
            busy_after = system_busy_seconds()
            others = (
                None
                if busy_before is None or busy_after is None
                else max(busy_after - busy_before - ours, 0.0) / seconds
            )
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id=request.study_name))
            ).trials
        assert final is not None, "the study never finished"
        finished = [
            t
            for t in trials
            if t.state in (optimizer_pb2.TRIAL_STATE_COMPLETE, optimizer_pb2.TRIAL_STATE_PRUNED)
        ]
        port_of = {a: f"trainer {i + 1}" for i, a in enumerate(addresses)}
        return Outcome(
            trainers=n_trainers,
            seconds=seconds,
            state=optimizer_pb2.StudyState.Name(final.state).removeprefix("STUDY_STATE_"),
            finished=len(finished),
            per_trainer=dict(Counter(port_of.get(t.trainer, t.trainer) for t in finished)),
            best=final.best_trial.objective if final.best_trial.HasField("objective") else 0.0,
            most_at_once=most_at_once(list(trials)),
            trainer_cpu=trainer_cpu,
            others_cores=others,
        )
    finally:
        for s in servers:
            await s.stop(2)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def main() -> None:
    args = parse_args()
    configure_logging("plain", "WARNING")
    sys.path.insert(0, str(REPO))  # the tests' tiny Qwen3 builder
    from tests.unit.trainer.conftest import build_tiny_qwen

    with tempfile.TemporaryDirectory(prefix="study-parallel-") as tmp:
        work = Path(tmp)
        model = build_tiny_qwen(work / "tiny-qwen3")
        dataset = write_dataset(work / "data.jsonl", args.rows)
        request = study_request(dataset, model, args.trials, args.epochs, args.seed)
        print(
            f"study: {args.trials} trials, tiny Qwen3 (2 layers, hidden 32), {args.rows} rows, "
            f"{args.epochs} epoch(s), random sampler seed {args.seed}, pruner none; "
            f"trainers as processes with {args.threads} torch thread(s) each; "
            f"{os.cpu_count()} CPUs"
        )
        outcomes: list[Outcome] = []
        for _ in range(args.repeat):
            for n in (1, 2):
                outcome = await run_study(n, work, request, args.threads)
                outcomes.append(outcome)
                others = "?" if outcome.others_cores is None else f"{outcome.others_cores:.2f}"
                print(
                    f"  {n} trainer(s): {outcome.seconds:6.1f} s  {outcome.state}, "
                    f"{outcome.finished} trials {outcome.per_trainer}, "
                    f"at most {outcome.most_at_once} at once, "
                    f"trainers' CPU {outcome.trainer_cpu:.1f} s, "
                    f"other processes used {others} cores, best f1_macro {outcome.best:.4f}"
                )
        one = sorted(o.seconds for o in outcomes if o.trainers == 1)
        two = sorted(o.seconds for o in outcomes if o.trainers == 2)
        mid_one, mid_two = one[len(one) // 2], two[len(two) // 2]
        print()
        print(f"{'trainers':>10} {'wall s (median)':>16}")
        print(f"{1:>10} {mid_one:>16.1f}")
        print(f"{2:>10} {mid_two:>16.1f}")
        print(f"speed-up with two trainers: {mid_one / mid_two:.2f}x (goal >= 1.8x)")
        busy = [o.others_cores for o in outcomes if o.others_cores is not None]
        if busy:
            free = (os.cpu_count() or 1) - max(busy)
            print(
                f"cores left by other processes: about {free:.1f} of {os.cpu_count()}; "
                "two one-thread trainers need two (and this process a little) to reach 2x"
            )


if __name__ == "__main__":
    asyncio.run(main())
