"""Benchmark: the control plane at a team's scale, with the trainers' compute simulated.

The real optimizer and evaluator as `loratune serve` processes (their CPU and memory read
from /proc through psutil), Optuna's storage in a real PostgreSQL started here (Debian's
initdb / pg_ctl; `--sqlite` for SQLite), and `--trainers` real TrainerService gRPC servers
in this process whose jobs are simulated (bench/simulated_trainer.py: real job handling
and data preparation, sleeps instead of steps, a classifier's validation predictions over
the real label set). `--studies` studies of `--trials` trials each run at once, each with
`--parallel` trials at a time, while `--watchers` clients follow their event streams and
one client lists studies, reads a study and a page of its trials in a loop.

Reported: trials per second; dispatch latency (a trainer's job ended to its next job
started, while trials waited) p50 / p95; the optimizer's CPU seconds per trial and as a
share of the trainers' busy time; its resident memory at the start, the peak and the end;
storage bytes per trial; GetStudy, a ListTrials page, ListStudies p50 / p95 as the work
grows; event fan-out latency (an event's time to a watcher's receipt) p50 / p95.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/control_plane_scale.py \\
        [--trainers 16] [--studies 10] [--trials 100] [--epochs 3] [--classes 300] \\
        [--validation-rows 20000] [--step-seconds 0.01] [--steps 20] [--watchers 50] [--sqlite]
        [--json FIGURES.json]
    .venv/bin/python bench/control_plane_scale.py --plot A.json B.json C.json [--out PNG]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import psutil  # noqa: E402
from simulated_trainer import Pace, SimulatedRunner, start_simulated_trainer  # noqa: E402

from loratune.common.v1 import common_pb2  # noqa: E402
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc  # noqa: E402
from tests.integration import postgres as postgres_helper  # noqa: E402

SERVE = (sys.executable, "-m", "services.cli.main", "serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values` in seconds; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def storage_size(storage: str, work: Path) -> int:
    """Bytes of the study storage: the SQLite file, or the PostgreSQL database."""
    if storage.startswith("sqlite"):
        path = work / "optuna.db"
        return path.stat().st_size if path.is_file() else 0
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(storage)
        with engine.connect() as connection:
            size = connection.execute(
                sqlalchemy.text("SELECT pg_database_size(current_database())")
            ).scalar()
        engine.dispose()
        return int(size or 0)
    except Exception:  # the size is a report, never a reason to fail the run
        return 0


def quantiles(values: list[float]) -> str:
    """'p50 / p95' in milliseconds."""
    if not values:
        return "-"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"{statistics.median(ordered) * 1000:.1f} / {p95 * 1000:.1f} ms"


def serve(service: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`loratune serve <service>` as a process (its output in `log`)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "serve",
                service,
                "--port",
                str(port),
                "--metrics-port",
                "-1",
            ],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_serving(address: str, timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    raise SystemExit(f"{address} never became SERVING")


def write_dataset(
    folder: Path, classes: int, train_rows: int, validation_rows: int
) -> tuple[Path, Path]:
    """A classification dataset of `classes` labels: a training file and a validation file."""
    folder.mkdir(parents=True, exist_ok=True)
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    for path, rows in ((train, train_rows), (validation, validation_rows)):
        with path.open("w") as out:
            for i in range(rows):
                out.write(json.dumps({"text": f"payment {i}", "label": f"code-{i % classes:03d}"}))
                out.write("\n")
    return train, validation


@dataclass
class Timings:
    """What the clients measured."""

    get_study: list[tuple[int, float]] = field(default_factory=list)  # (trials done, seconds)
    list_page: list[tuple[int, float]] = field(default_factory=list)
    list_studies: list[tuple[int, float]] = field(default_factory=list)
    fan_out: list[float] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (time, cpu seconds)
    rss: list[tuple[float, int]] = field(default_factory=list)


async def reader(
    stub: optimizer_pb2_grpc.OptimizerServiceStub,
    names: list[str],
    t: Timings,
    done: asyncio.Event,
    finished: list[int],
) -> None:
    """One console user: list the studies, open one, read a page of its trials, in a loop."""
    i = 0
    while not done.is_set():
        name = names[i % len(names)]
        i += 1
        started = time.perf_counter()
        await stub.ListStudies(optimizer_pb2.ListStudiesRequest())
        t.list_studies.append((finished[0], time.perf_counter() - started))
        started = time.perf_counter()
        await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=name))
        t.get_study.append((finished[0], time.perf_counter() - started))
        started = time.perf_counter()
        await stub.ListTrials(
            optimizer_pb2.ListTrialsRequest(
                study_id=name, page_size=100, view=optimizer_pb2.TRIAL_VIEW_BASIC
            )
        )
        t.list_page.append((finished[0], time.perf_counter() - started))
        await asyncio.sleep(0.5)


async def watcher(stub: optimizer_pb2_grpc.OptimizerServiceStub, name: str, t: Timings) -> None:
    """A client following a study's events; the fan-out latency of each live one."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id=name)):
            lag = time.time() - event.time.ToDatetime().timestamp()
            if lag < 60:  # replayed history is not fan-out
                t.fan_out.append(lag)


async def monitor(process: psutil.Process, t: Timings, done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            t.cpu.append((time.monotonic(), times.user + times.system))
            t.rss.append((time.monotonic(), process.memory_info().rss))
        await asyncio.sleep(1.0)


class Recorder(SimulatedRunner):
    """The simulated runner, recording when each trainer's jobs start and end."""

    def __init__(self, pace: Pace, log: list[tuple[str, float, float]], name: str) -> None:
        super().__init__(pace)
        self._log, self._name = log, name
        self._accepted = 0.0

    def validate(self, spec):  # type: ignore[no-untyped-def]
        # StartTraining reached the trainer: the job started (its data is read from here on).
        self._accepted = time.monotonic()
        return super().validate(spec)

    def run(self, spec, prepared, ctx):  # type: ignore[no-untyped-def]
        started = self._accepted or time.monotonic()
        try:
            return super().run(spec, prepared, ctx)
        finally:
            self._log.append((self._name, started, time.monotonic()))


def dispatch_latencies(log: list[tuple[str, float, float]]) -> list[float]:
    """Per trainer: each job's start minus the previous job's end (the trainer idle)."""
    by_trainer: dict[str, list[tuple[float, float]]] = {}
    for name, start, end in log:
        by_trainer.setdefault(name, []).append((start, end))
    gaps = []
    for jobs in by_trainer.values():
        jobs.sort()
        gaps += [b[0] - a[1] for a, b in itertools.pairwise(jobs)]
    return gaps


async def measure_evaluator(
    address: str, pid: int, classes: int, rows: int, rounds: int = 5
) -> dict[str, float]:
    """One trial's evaluation at this size through the real evaluator: its seconds (p50 of
    `rounds`), the evaluator's resident memory after, the response's bytes, and the bytes of
    the evaluation document a trial keeps per epoch (evaluation_results.json)."""
    import random

    from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
    from services.optimizer.api.convert import evaluation_document
    from services.optimizer.core.results import evaluation_json

    labels = [f"code-{i:03d}" for i in range(classes)]
    rng = random.Random(1)
    references = [labels[i % classes] for i in range(rows)]
    predictions = [r if rng.random() < 0.85 else rng.choice(labels) for r in references]
    request = evaluator_pb2.EvaluateRequest(
        task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
        predictions=predictions,
        references=references,
        labels=labels,
    )
    seconds = []
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
    ) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        for _ in range(rounds):
            started = time.perf_counter()
            reply = await stub.Evaluate(request)
            seconds.append(time.perf_counter() - started)
    document = evaluation_json(evaluation_document(reply.result))  # as a trial writes it
    return {
        "evaluate_seconds_p50": statistics.median(seconds),
        "evaluator_rss_mib": psutil.Process(pid).memory_info().rss / 2**20,
        "request_bytes": request.ByteSize(),
        "response_bytes": reply.ByteSize(),
        "document_bytes": len(document.encode()),
    }


async def run(args: argparse.Namespace, storage: str, work: Path) -> None:
    pace = Pace(args.step_seconds, args.steps)
    log: list[tuple[str, float, float]] = []
    trainers = []
    for i in range(args.trainers):
        runner = Recorder(pace, log, f"t{i}")
        trainers.append(await start_simulated_trainer(work / "runs", runner=runner))
    train, validation = write_dataset(
        work / "data", args.classes, max(args.classes * 3, 300), args.validation_rows
    )
    evaluator_port, optimizer_port = free_port(), free_port()
    evaluator = serve("evaluator", evaluator_port, {}, work / "evaluator.log")
    optimizer = serve(
        "optimizer",
        optimizer_port,
        {
            "LORATUNE_TRAINERS": ",".join(t.address for t in trainers),
            "LORATUNE_EVALUATOR_ADDRESS": f"127.0.0.1:{evaluator_port}",
            "LORATUNE_STORAGE_URL": storage,
            "LORATUNE_ARTIFACT_ROOT": str(work / "runs"),
            "LORATUNE_POLL_SECONDS": "0.1",
        },
        work / "optimizer.log",
    )
    timings = Timings()
    try:
        await wait_serving(f"127.0.0.1:{evaluator_port}")
        await wait_serving(f"127.0.0.1:{optimizer_port}")
        evaluation = await measure_evaluator(
            f"127.0.0.1:{evaluator_port}", evaluator.pid, args.classes, args.validation_rows
        )
        process = psutil.Process(optimizer.pid)
        rss_start = process.memory_info().rss
        storage_before = storage_size(storage, work)  # an empty PostgreSQL database is ~8 MB
        names = [f"scale-{i}" for i in range(args.studies)]
        done = asyncio.Event()
        finished = [0]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{optimizer_port}") as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            started = time.monotonic()
            for name in names:
                await stub.CreateStudy(
                    optimizer_pb2.CreateStudyRequest(
                        study_name=name,
                        project_id=1,
                        fine_tuning_params=optimizer_pb2.FineTuningParams(
                            base_model_name="simulated/encoder", n_trials=args.trials
                        ),
                        dataset=common_pb2.DatasetSpec(
                            uri=str(train),
                            validation_uri=str(validation),
                            task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                            seed=1,
                        ),
                        search_space=optimizer_pb2.SearchSpace(rank=[8], num_epochs=[args.epochs]),
                        pruner="median",
                        max_parallel_trials=args.parallel,
                    )
                )
            tasks = [asyncio.create_task(monitor(process, timings, done))]
            tasks.append(asyncio.create_task(reader(stub, names, timings, done, finished)))
            tasks += [
                asyncio.create_task(watcher(stub, names[i % len(names)], timings))
                for i in range(args.watchers)
            ]
            while True:
                studies = (await stub.ListStudies(optimizer_pb2.ListStudiesRequest())).studies
                finished[0] = sum(
                    s.trials_complete + s.trials_pruned + s.trials_failed for s in studies
                )
                if all(
                    s.state
                    not in (optimizer_pb2.STUDY_STATE_QUEUED, optimizer_pb2.STUDY_STATE_RUNNING)
                    for s in studies
                ):
                    break
                print(
                    f"  {finished[0]} trials done, {time.monotonic() - started:.0f} s", flush=True
                )
                await asyncio.sleep(5)
            wall = time.monotonic() - started
            done.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            rss_end = process.memory_info().rss
            failed = sum(s.trials_failed for s in studies)
    finally:
        for proc in (optimizer, evaluator):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        for trainer in trainers:
            await trainer.stop(0)
    trials = finished[0]
    busy = sum(end - start for _, start, end in log)
    cpu = timings.cpu[-1][1] - timings.cpu[0][1] if len(timings.cpu) > 1 else float("nan")
    gaps = dispatch_latencies(log)
    peak = max((r for _, r in timings.rss), default=rss_end)
    storage_bytes = max(0, storage_size(storage, work) - storage_before)
    result = {
        "trainers": args.trainers,
        "studies": args.studies,
        "trials_per_study": args.trials,
        "classes": args.classes,
        "validation_rows": args.validation_rows,
        "storage": storage.split(":")[0],
        "trials": trials,
        "failed": failed,
        "wall_seconds": wall,
        "dispatch_p50": percentile(gaps, 0.5),
        "dispatch_p95": percentile(gaps, 0.95),
        "optimizer_cpu_seconds": cpu,
        "cpu_per_trial": cpu / max(trials, 1),
        "cpu_share_of_trainer_time": cpu / max(busy, 1e-9),
        "rss_start_mib": rss_start / 2**20,
        "rss_peak_mib": peak / 2**20,
        "rss_end_mib": rss_end / 2**20,
        "storage_bytes_per_trial": storage_bytes / max(trials, 1) if storage_bytes else None,
        "get_study_p95": percentile([v for _, v in timings.get_study], 0.95),
        "list_page_p95": percentile([v for _, v in timings.list_page], 0.95),
        "list_studies_p95": percentile([v for _, v in timings.list_studies], 0.95),
        "fan_out_p95": percentile(timings.fan_out, 0.95),
        **evaluation,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(
        f"\n{args.trainers} trainers, {args.studies} studies x {args.trials} trials "
        f"(parallel {args.parallel}), {args.epochs} epochs, {args.classes} classes, "
        f"{args.validation_rows} validation rows, storage {storage.split(':')[0]}"
    )
    print(f"trials finished: {trials} ({failed} failed) in {wall:.0f} s ({trials / wall:.2f}/s)")
    print(f"dispatch latency p50 / p95: {quantiles(gaps)}")
    print(
        f"optimizer CPU: {cpu:.1f} s, {cpu / max(trials, 1) * 1000:.0f} ms per trial, "
        f"{cpu / max(busy, 1e-9) * 100:.2f}% of the trainers' busy time ({busy:.0f} s)"
    )
    print(
        f"optimizer memory: {rss_start / 2**20:.0f} MiB at start, {peak / 2**20:.0f} MiB peak, "
        f"{rss_end / 2**20:.0f} MiB at the end"
    )
    for label, values in (
        ("GetStudy", timings.get_study),
        ("ListTrials page of 100", timings.list_page),
        ("ListStudies", timings.list_studies),
    ):
        last = [v for n, v in values if n >= trials * 0.8]
        print(f"{label}: all {quantiles([v for _, v in values])}; last fifth {quantiles(last)}")
    print(f"event fan-out to {args.watchers} watchers: {quantiles(timings.fan_out)}")
    print(
        f"one evaluation of {args.validation_rows} rows, {args.classes} classes: "
        f"{evaluation['evaluate_seconds_p50'] * 1000:.0f} ms (p50), evaluator "
        f"{evaluation['evaluator_rss_mib']:.0f} MiB; request "
        f"{evaluation['request_bytes'] / 1024:.0f} KiB, response "
        f"{evaluation['response_bytes'] / 1024:.0f} KiB, kept per epoch "
        f"{evaluation['document_bytes'] / 1024:.0f} KiB"
    )
    if storage_bytes:
        per_trial = storage_bytes / max(trials, 1)
        print(f"storage: {storage_bytes / 2**20:.1f} MiB, {per_trial:.0f} B/trial")


def plot(figures: list[Path], out: Path) -> None:
    """The runs' figures against their number of trials, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(path.read_text()) for path in figures), key=lambda r: r["trials"])
    trials = [r["trials"] for r in runs]
    panels = [
        ("dispatch latency (ms)", [("p50", "dispatch_p50"), ("p95", "dispatch_p95")], 1000),
        ("optimizer CPU per trial (ms)", [("CPU", "cpu_per_trial")], 1000),
        ("optimizer memory (MiB)", [("start", "rss_start_mib"), ("end", "rss_end_mib")], 1),
        (
            "reads, p95 (ms)",
            [
                ("GetStudy", "get_study_p95"),
                ("ListTrials page", "list_page_p95"),
                ("ListStudies", "list_studies_p95"),
                ("event fan-out", "fan_out_p95"),
            ],
            1000,
        ),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (title, series, scale) in zip(axes, panels, strict=True):
        for label, key in series:
            values = [(r[key] or 0) * scale for r in runs]
            axis.plot(trials, values, marker="o", label=label)
        axis.set_xscale("log")
        axis.set_xlabel("trials in the run")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    first = runs[-1]
    fig.suptitle(
        f"control plane: {first['trainers']} simulated trainers, {first['classes']} classes, "
        f"{first['validation_rows']} validation rows, {first['storage']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trainers", type=int, default=16)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--classes", type=int, default=300)
    parser.add_argument("--validation-rows", type=int, default=20000)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--watchers", type=int, default=50)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(
        "--plot", nargs="+", type=Path, help="only plot these runs' JSON files against trials"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "control_plane_scale.png")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="control-plane-"))
    if args.sqlite:
        asyncio.run(run(args, f"sqlite:///{work / 'optuna.db'}", work))
        return
    if not postgres_helper.available():
        raise SystemExit("PostgreSQL binaries (initdb, pg_ctl) are not installed; or --sqlite")
    with postgres_helper.postgres_server(max_connections=200) as url:
        asyncio.run(run(args, url, work))


if __name__ == "__main__":
    main()
