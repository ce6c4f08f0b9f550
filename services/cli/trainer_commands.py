"""Trainer commands of the CLI: serve trainer, prepare-data, train, evaluate-adapter."""

from __future__ import annotations

import asyncio
import csv
import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from loratune.common.v1 import common_pb2
from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.errors import EXIT_FAILED, exit_for, run_rpc, usage_error
from services.common.classification import classification_report
from services.common.errors import LoratuneError

console = Console()
errors = Console(stderr=True)

TASKS = {
    "classification": common_pb2.TASK_TYPE_CLASSIFICATION,
    "generation": common_pb2.TASK_TYPE_GENERATION,
}

TaskOption = Annotated[str, typer.Option("--task", help="classification or generation.")]
DatasetOption = Annotated[Path, typer.Option("--dataset", help="Training data, JSONL or CSV.")]


def _task(value: str) -> common_pb2.TaskType.ValueType:
    if value not in TASKS:
        raise usage_error(f"--task must be classification or generation, not {value!r}")
    return TASKS[value]


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    """Adds the trainer's commands to the `loratune` app."""

    @serve_app.command("trainer")
    def serve_trainer(
        port: Annotated[int, typer.Option("--port", help="gRPC port.")] = 50052,
        metrics_port: Annotated[
            int, typer.Option("--metrics-port", help="/metrics port (-1 = off).")
        ] = 9092,
    ) -> None:
        """Serve loratune.trainer.v1.TrainerService."""
        from services.trainer.main import main as trainer_main

        raise typer.Exit(trainer_main(port, None if metrics_port < 0 else metrics_port))

    @app.command("prepare-data")
    def prepare_data(
        dataset: DatasetOption,
        task: TaskOption = "classification",
        text_field: Annotated[str, typer.Option("--text-field")] = "text",
        label_field: Annotated[str, typer.Option("--label-field")] = "label",
        prompt_field: Annotated[str, typer.Option("--prompt-field")] = "prompt",
        target_field: Annotated[str, typer.Option("--target-field")] = "response",
        validation: Annotated[Path | None, typer.Option("--validation")] = None,
        validation_fraction: Annotated[float, typer.Option("--validation-fraction")] = 0.1,
        seed: Annotated[int, typer.Option("--seed")] = 42,
        min_samples_per_class: Annotated[
            int | None,
            typer.Option("--min-samples-per-class", help="Default: MIN_SAMPLES_PER_CLASS."),
        ] = None,
        output: Annotated[Path, typer.Option("--output", "-o")] = Path("prepared"),
    ) -> None:
        """Validate a dataset, print class statistics, write the split and class_weights.json."""
        from services.common.defaults import TrainingDefaults
        from services.trainer.core.data import class_statistics_table, prepare, write_split
        from services.trainer.core.types import DatasetSpec, Task

        _task(task)
        spec = DatasetSpec(
            uri=str(dataset),
            task=Task(task),
            text_field=text_field,
            label_field=label_field,
            prompt_field=prompt_field,
            target_field=target_field,
            validation_uri=str(validation) if validation else "",
            validation_fraction=validation_fraction,
            seed=seed,
        )
        minimum = (
            min_samples_per_class
            if min_samples_per_class is not None
            else TrainingDefaults().min_samples_per_class
        )
        try:
            data = prepare(spec, minimum)
        except LoratuneError as err:
            raise exit_for(err) from None
        paths = write_split(data, output)
        console.print(f"{len(data.train)} training rows, {len(data.validation)} validation rows")
        if data.stats is not None:
            table = Table(title="Classes (training split)")
            for column in ("label", "train", "validation", "weight"):
                table.add_column(column, justify="left" if column == "label" else "right")
            for label, train_count, val_count, weight in class_statistics_table(data):
                table.add_row(label, str(train_count), str(val_count), f"{weight:.3f}")
            console.print(table)
            console.print(
                f"imbalance ratio (largest / smallest class): {data.stats.imbalance_ratio:.1f}"
            )
            if data.stats.excluded:
                excluded = ", ".join(f"{k} ({v})" for k, v in sorted(data.stats.excluded.items()))
                console.print(f"[yellow]left out (< {minimum} rows):[/yellow] {excluded}")
        for name, path in paths.items():
            console.print(f"wrote {name}: {path}")

    @app.command("train")
    def train_command(
        dataset: DatasetOption,
        task: TaskOption = "classification",
        base_model: Annotated[
            str | None, typer.Option("--base-model", help="Default: LORA_MODEL_NAME.")
        ] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
        text_field: Annotated[str, typer.Option("--text-field")] = "",
        label_field: Annotated[str, typer.Option("--label-field")] = "",
        validation: Annotated[Path | None, typer.Option("--validation")] = None,
        rank: Annotated[int | None, typer.Option("--rank")] = None,
        alpha: Annotated[float | None, typer.Option("--alpha")] = None,
        dropout: Annotated[float | None, typer.Option("--dropout")] = None,
        target_modules: Annotated[
            str, typer.Option("--target-modules", help="Comma-separated; empty = all linear.")
        ] = "",
        learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
        max_seq_length: Annotated[int | None, typer.Option("--max-seq-length")] = None,
        focal_gamma: Annotated[float | None, typer.Option("--focal-gamma")] = None,
        class_weights: Annotated[
            bool | None, typer.Option("--class-weights/--no-class-weights")
        ] = None,
        weighted_sampler: Annotated[
            bool | None, typer.Option("--weighted-sampler/--no-weighted-sampler")
        ] = None,
        min_samples_per_class: Annotated[int, typer.Option("--min-samples-per-class")] = 0,
        quantize_4bit: Annotated[bool, typer.Option("--quantize-4bit")] = False,
        seed: Annotated[int, typer.Option("--seed")] = 42,
        trainer: Annotated[
            str | None,
            typer.Option("--trainer", help="Trainer address host:port; none = train here."),
        ] = None,
    ) -> None:
        """One training run with the given hyperparameters (no search), with a progress bar."""
        from services.common.defaults import TrainingDefaults

        defaults = TrainingDefaults()
        job_id = f"train-{uuid.uuid4().hex[:8]}"
        request = trainer_pb2.StartTrainingRequest(
            job_id=job_id,
            base_model=base_model or defaults.lora_model_name,
            dataset=common_pb2.DatasetSpec(
                uri=str(dataset.resolve()),
                task_type=_task(task),
                text_field=text_field,
                label_field=label_field,
                validation_uri=str(validation.resolve()) if validation else "",
                seed=seed,
            ),
            hyperparameters=common_pb2.Hyperparameters(
                lora=common_pb2.LoraParams(
                    rank=rank if rank is not None else defaults.lora_rank,
                    alpha=alpha if alpha is not None else defaults.lora_alpha,
                    dropout=dropout if dropout is not None else defaults.lora_dropout,
                    target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
                ),
                training=common_pb2.TrainingParams(
                    learning_rate=(
                        learning_rate if learning_rate is not None else defaults.lora_learning_rate
                    ),
                    num_epochs=epochs if epochs is not None else defaults.lora_num_epochs,
                    batch_size=batch_size if batch_size is not None else defaults.lora_batch_size,
                    max_seq_length=max_seq_length or defaults.max_seq_length,
                    quantize_4bit=quantize_4bit,
                    seed=seed,
                ),
                balancing=common_pb2.BalancingParams(
                    focal_gamma=focal_gamma
                    if focal_gamma is not None
                    else defaults.focal_loss_gamma,
                    use_class_weights=(
                        class_weights if class_weights is not None else defaults.use_class_weights
                    ),
                    use_weighted_sampler=(
                        weighted_sampler
                        if weighted_sampler is not None
                        else defaults.use_weighted_sampler
                    ),
                    min_samples_per_class=min_samples_per_class,
                ),
            ),
            output_dir=str((output or Path("runs") / job_id).resolve()),
        )
        final = run_rpc(_train(trainer, request))
        if final.HasField("failed"):
            reason = trainer_pb2.FailureReason.Name(final.failed.reason)
            errors.print(f"[red]training failed ({reason}):[/red] {final.failed.message}")
            raise typer.Exit(EXIT_FAILED)
        console.print(
            f"adapter saved to {final.completed.artifact_dir} "
            f"({final.completed.train_seconds:.1f} s of training)"
        )

    @app.command("evaluate-adapter")
    def evaluate_adapter(
        adapter: Annotated[Path, typer.Option("--adapter", help="A trained adapter's folder.")],
        dataset: Annotated[Path, typer.Option("--dataset", help="Labelled data, JSONL or CSV.")],
        text_field: Annotated[str, typer.Option("--text-field")] = "text",
        label_field: Annotated[str, typer.Option("--label-field")] = "label",
        evaluator: Annotated[
            str | None,
            typer.Option(
                "--evaluator",
                envvar="LORATUNE_EVALUATOR_ADDRESS",
                help="Evaluator address; none = evaluate here.",
            ),
        ] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    ) -> None:
        """Score a trained classification adapter on a labelled dataset with the evaluator."""
        from services.cli.render import render_evaluation
        from services.trainer.core.artifacts import load_adapter_for_inference, predict_labels
        from services.trainer.core.data import load_examples
        from services.trainer.core.types import DatasetSpec, Task

        spec = DatasetSpec(
            uri=str(dataset),
            task=Task.CLASSIFICATION,
            text_field=text_field,
            label_field=label_field,
        )
        try:
            rows = load_examples(str(dataset), "", Task.CLASSIFICATION, spec)
            loaded = load_adapter_for_inference(adapter)
            with console.status(f"predicting {len(rows)} rows"):
                predictions = predict_labels(loaded, [r.text for r in rows], batch_size=batch_size)
            result = asyncio.run(
                _evaluate([r.label for r in rows], predictions, list(loaded.labels), evaluator)
            )
        except (LoratuneError, grpc.aio.AioRpcError) as err:
            raise exit_for(err) from None
        render_evaluation(console, result)
        out_dir = output or adapter / "evaluation"
        written = write_evaluation_files(result, out_dir)
        for path in written:
            console.print(f"wrote {path}")


async def _train(
    address: str | None, request: trainer_pb2.StartTrainingRequest
) -> trainer_pb2.TrainingEvent:
    """Submits the job (to `address`, or to a trainer served here) and follows it."""
    from services.common.client import ClientSettings, create_channel

    if address:
        async with create_channel(address, ClientSettings.from_env()) as channel:
            return await _follow(trainer_pb2_grpc.TrainerServiceStub(channel), request)
    from services.common.config import CommonSettings
    from services.common.defaults import TrainingDefaults
    from services.common.logging import configure_logging
    from services.common.server import start_server
    from services.trainer.config import TrainerSettings
    from services.trainer.main import build_manager, service_definition

    configure_logging("plain", "WARNING")
    # The trainer served here writes only where this command was told to (--output).
    settings = TrainerSettings(artifact_root=Path(request.output_dir).parent)
    manager = build_manager(settings)
    server = await start_server(
        [service_definition(manager, settings, TrainingDefaults())],
        CommonSettings(reflection=False, auth_token=None),
        host="127.0.0.1",
        metrics_port=None,
    )
    try:
        async with create_channel(server.address, ClientSettings()) as channel:
            return await _follow(trainer_pb2_grpc.TrainerServiceStub(channel), request)
    finally:
        await server.stop(5)


async def _follow(
    stub: trainer_pb2_grpc.TrainerServiceAsyncStub, request: trainer_pb2.StartTrainingRequest
) -> trainer_pb2.TrainingEvent:
    """Starts the job and shows its progress until it completes or fails."""
    await stub.StartTraining(request)
    last: Any = None
    epochs: list[tuple[int, float, str]] = []  # (epoch, score: higher is better, adapter_dir)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(request.job_id, total=None, info="")
        async for event in stub.WatchTraining(
            trainer_pb2.WatchTrainingRequest(job_id=request.job_id)
        ):
            last = event
            kind = event.WhichOneof("event")
            if kind == "progress":
                p = event.progress
                progress.update(
                    bar,
                    total=p.total_steps,
                    completed=p.step,
                    info=f"epoch {p.epoch:.2f} loss {p.loss:.4f} {p.samples_per_second:.1f}/s",
                )
            elif kind == "dataset_prepared":
                d = event.dataset_prepared
                progress.console.print(
                    f"data: {d.train_rows} train / {d.validation_rows} validation rows, "
                    f"{len(d.labels)} labels"
                    + (f", left out: {', '.join(d.excluded_classes)}" if d.excluded_classes else "")
                )
            elif kind == "evaluation":
                e = event.evaluation
                line = f"epoch {e.epoch:.0f}: eval loss {e.eval_loss:.4f}"
                score = -e.eval_loss
                if e.labels and e.predictions:
                    report = classification_report(
                        list(e.predictions), list(e.references), list(e.labels)
                    )
                    score = report.f1_macro
                    line += f", accuracy {report.accuracy:.3f}, macro-F1 {report.f1_macro:.4f}"
                epochs.append((round(e.epoch), score, e.adapter_dir))
                progress.console.print(line)
    if last is None:
        raise RuntimeError("the trainer sent no events")
    final: trainer_pb2.TrainingEvent = last
    if final.HasField("completed") and epochs:
        _keep_best_epoch(
            Path(final.completed.artifact_dir),
            epochs,
            classification=bool(request.dataset.task_type == common_pb2.TASK_TYPE_CLASSIFICATION),
        )
    return final


def _keep_best_epoch(
    out_dir: Path, epochs: list[tuple[int, float, str]], *, classification: bool
) -> None:
    """Keeps the best epoch's adapter (macro-F1; lowest eval loss for generation) and says so."""
    from services.optimizer.core.results import keep_adapter

    best = epochs[0]
    for epoch in epochs[1:]:
        if epoch[1] > best[1]:
            best = epoch
    keep_adapter(out_dir, best[2])
    measure = "macro-F1" if classification else "eval loss"
    value = best[1] if classification else -best[1]
    console.print(
        f"kept epoch {best[0]} of {len(epochs)} ({measure} {value:.4f}"
        + (f"; last epoch {abs(epochs[-1][1]):.4f})" if best is not epochs[-1] else ")")
    )


async def _evaluate(
    references: list[str], predictions: list[str], labels: list[str], address: str | None
) -> common_pb2.EvaluationResult:
    from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc

    request = evaluator_pb2.EvaluateRequest(
        task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
        predictions=predictions,
        references=references,
        labels=labels,
    )
    if address:
        from services.common.client import ClientSettings, create_channel

        async with create_channel(address, ClientSettings.from_env()) as channel:
            return (await evaluator_pb2_grpc.EvaluatorServiceStub(channel).Evaluate(request)).result
    from services.evaluator.api.convert import input_from_proto, result_to_proto
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.main import build_evaluator

    evaluation = await build_evaluator(EvaluatorSettings()).evaluate(input_from_proto(request))
    return result_to_proto(evaluation)


def write_evaluation_files(result: common_pb2.EvaluationResult, out_dir: Path) -> list[Path]:
    """evaluation_results.json, confusion_matrix.csv and confusion_matrix.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "evaluation_results.json"
    results.write_text(
        json.dumps(json_format.MessageToDict(result), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    matrix = result.classification.confusion_matrix
    labels = list(matrix.labels)
    n = len(labels)
    rows = [list(matrix.counts[i * n : (i + 1) * n]) for i in range(n)]
    csv_path = out_dir / "confusion_matrix.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *labels])
        for label, row in zip(labels, rows, strict=True):
            writer.writerow([label, *row])
    png_path = out_dir / "confusion_matrix.png"
    _heatmap(labels, rows, png_path)
    return [results, csv_path, png_path]


def _heatmap(labels: list[str], rows: list[list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, min(24.0, 0.3 * len(labels) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rows, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6 if len(labels) > 30 else 8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 30 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    if len(labels) <= 20:
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
