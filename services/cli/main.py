"""The `loratune` command: serve a service, evaluate predictions."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from services.cli import optimizer_commands, project_commands, trainer_commands
from services.cli.errors import EXIT_FAILED, run_rpc, usage_error
from services.cli.inputs import read_items
from services.cli.render import render_evaluation

app = typer.Typer(
    name="loratune",
    help="LoRA / QLoRA fine-tuning with automatic hyperparameter search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
serve_app = typer.Typer(
    help="Run one loratune service until SIGTERM / Ctrl-C.", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")


@app.callback()
def _before_any_command() -> None:
    # Some library messages come at import (bitsandbytes) or from loaders a command runs
    # before it sets up logging (`evaluate-adapter`): their filters go in first.
    from services.common.logging import quiet_library_noise

    quiet_library_noise()


console = Console()
errors = Console(stderr=True)

PortOption = Annotated[int, typer.Option("--port", help="gRPC port (0 = any free port).")]
MetricsPortOption = Annotated[
    int, typer.Option("--metrics-port", help="Prometheus /metrics port (-1 = off).")
]


class Task(enum.StrEnum):
    """Task types on the command line."""

    classification = "classification"
    generation = "generation"


def _metrics_port(value: int) -> int | None:
    return None if value < 0 else value


@serve_app.command("evaluator")
def serve_evaluator(port: PortOption = 50053, metrics_port: MetricsPortOption = 9093) -> None:
    """Serve loratune.evaluator.v1.EvaluatorService."""
    from services.evaluator.main import main as evaluator_main

    raise typer.Exit(evaluator_main(port, _metrics_port(metrics_port)))


@serve_app.command("judge-gateway")
def serve_judge_gateway(port: PortOption = 50054, metrics_port: MetricsPortOption = 9094) -> None:
    """Serve loratune.judge.v1.JudgeGatewayService."""
    from services.judge_gateway.main import main as judge_main

    raise typer.Exit(judge_main(port, _metrics_port(metrics_port)))


@serve_app.command("optimizer")
def serve_optimizer(port: PortOption = 50051, metrics_port: MetricsPortOption = 9091) -> None:
    """Serve loratune.optimizer.v1.OptimizerService."""
    from services.optimizer.main import main as optimizer_main

    raise typer.Exit(optimizer_main(port, _metrics_port(metrics_port)))


ConsoleOptimizerOption = Annotated[
    str | None,
    typer.Option(
        "--optimizer",
        envvar="LORATUNE_OPTIMIZER_ADDRESS",
        help="Optimizer address host:port (env LORATUNE_OPTIMIZER_ADDRESS).",
    ),
]
ConsoleJudgeOption = Annotated[
    str | None,
    typer.Option(
        "--judge",
        envvar="LORATUNE_JUDGE_ADDRESS",
        help="Judge gateway address host:port, for /api/v1/judge-models "
        "(env LORATUNE_JUDGE_ADDRESS).",
    ),
]
ConsoleHostOption = Annotated[
    str | None, typer.Option("--host", help="Interface to listen on (env LORATUNE_HOST).")
]
HttpPortOption = Annotated[int, typer.Option("--port", help="HTTP port (0 = any free port).")]


def _run_console(
    port: int, metrics_port: int, host: str | None, optimizer: str | None, judge: str | None
) -> None:
    from services.console.main import main as console_main

    if not optimizer:
        raise usage_error(
            "no optimizer address: pass --optimizer or set LORATUNE_OPTIMIZER_ADDRESS"
        )
    raise typer.Exit(
        console_main(
            port,
            _metrics_port(metrics_port),
            host=host,
            optimizer_address=optimizer,
            judge_address=judge,
        )
    )


@serve_app.command("console")
def serve_console_command(
    port: HttpPortOption = 8080,
    metrics_port: MetricsPortOption = 9095,
    host: ConsoleHostOption = None,
    optimizer: ConsoleOptimizerOption = None,
    judge: ConsoleJudgeOption = None,
) -> None:
    """Serve the web console and its JSON API (/api/v1) in front of the optimizer."""
    _run_console(port, metrics_port, host, optimizer, judge)


@app.command("console")
def console_command(
    port: HttpPortOption = 8080,
    host: ConsoleHostOption = None,
    optimizer: ConsoleOptimizerOption = None,
    judge: ConsoleJudgeOption = None,
    metrics_port: MetricsPortOption = -1,
) -> None:
    """Serve the web console: `serve console`, with no metrics port unless one is given."""
    _run_console(port, metrics_port, host, optimizer, judge)


GatewayOption = Annotated[
    str | None,
    typer.Option(
        "--gateway",
        envvar="LORATUNE_JUDGE_ADDRESS",
        help="Judge gateway address host:port; none = judge in this process.",
    ),
]


async def _call_gateway(
    address: str | None,
    call: Callable[[judge_pb2_grpc.JudgeGatewayServiceStub], Any],
) -> Any:
    """Runs `call` against the gateway at `address`, or an in-process one served on loopback."""
    from services.common.client import ClientSettings, create_channel

    if address:
        async with create_channel(address, ClientSettings.from_env()) as channel:
            return await call(judge_pb2_grpc.JudgeGatewayServiceStub(channel))
    from services.common.config import CommonSettings
    from services.common.logging import configure_logging
    from services.common.server import start_server
    from services.judge_gateway.config import JudgeSettings
    from services.judge_gateway.main import build_gateway, service_definition

    configure_logging("plain", "WARNING")
    server = await start_server(
        [service_definition(build_gateway(JudgeSettings()))],
        CommonSettings(reflection=False, auth_token=None),
        host="127.0.0.1",
        metrics_port=None,
    )
    try:
        async with create_channel(server.address, ClientSettings()) as channel:
            return await call(judge_pb2_grpc.JudgeGatewayServiceStub(channel))
    finally:
        await server.stop(0)


@app.command("judge-models")
def judge_models(gateway: GatewayOption = None) -> None:
    """List the judge models of the registry and whether each has credentials."""
    reply = run_rpc(
        _call_gateway(
            gateway, lambda stub: stub.ListJudgeModels(judge_pb2.ListJudgeModelsRequest())
        )
    )
    table = Table(title="Judge models")
    for column in ("id", "provider", "model", "available", "default"):
        table.add_column(column)
    for m in reply.models:
        available = "yes" if m.available else f"no (set {', '.join(m.missing_variables)})"
        table.add_row(m.id, m.provider, m.model_name, available, "*" if m.is_default else "")
    console.print(table)


@app.command("judge")
def judge_one(
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt that was answered.")],
    candidate: Annotated[str, typer.Option("--candidate", help="The answer to judge.")],
    reference: Annotated[str, typer.Option("--reference", help="The reference answer.")],
    model: Annotated[str, typer.Option("--model", help="Judge model id; empty = default.")] = "",
    gateway: GatewayOption = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 120.0,
) -> None:
    """Judge one item and print its score and the judge's reasoning."""
    request = judge_pb2.ScoreResponsesRequest(
        judge_model_id=model,
        items=[judge_pb2.JudgeItem(prompt=prompt, candidate=candidate, reference=reference)],
    )
    reply = run_rpc(
        _call_gateway(gateway, lambda stub: stub.ScoreResponses(request, timeout=timeout))
    )
    score = reply.scores[0]
    if not score.HasField("score"):
        outcome = judge_pb2.JudgeOutcome.Name(score.outcome)
        errors.print(f"[red]not judged ({outcome}):[/red] {score.error_message}")
        raise typer.Exit(EXIT_FAILED)
    console.print(f"score: [bold]{score.score:.0f}[/bold]/100  ({reply.provider_model})")
    console.print(f"reasoning: {score.reasoning}")


def _read(path: Path | None, what: str) -> list[str]:
    if path is None:
        return []
    try:
        return read_items(path)
    except (OSError, ValueError) as err:
        raise usage_error(f"cannot read {what}: {err}") from None


async def _evaluate_remote(
    address: str, request: evaluator_pb2.EvaluateRequest, timeout: float
) -> common_pb2.EvaluationResult:
    from services.common.client import ClientSettings, create_channel

    async with create_channel(address, ClientSettings.from_env()) as channel:
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(channel)
        response = await stub.Evaluate(request, timeout=timeout)
        return response.result


async def _evaluate_local(request: evaluator_pb2.EvaluateRequest) -> common_pb2.EvaluationResult:
    from services.common.logging import configure_logging
    from services.evaluator.api.convert import input_from_proto, result_to_proto
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.main import build_evaluator

    configure_logging("plain", "INFO")
    evaluator = build_evaluator(EvaluatorSettings())
    return result_to_proto(await evaluator.evaluate(input_from_proto(request)))


@app.command()
def evaluate(
    task: Annotated[Task, typer.Option("--task", help="classification or generation.")],
    predictions: Annotated[Path, typer.Option("--predictions", help="Predicted labels / texts.")],
    references: Annotated[Path, typer.Option("--references", help="Reference labels / texts.")],
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Prompts (generation, for the judge).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="The full label set (classification).")
    ] = None,
    judge: Annotated[
        str | None, typer.Option("--judge", help="Judge model id, e.g. gemini (generation).")
    ] = None,
    judge_sample_size: Annotated[int, typer.Option("--judge-sample-size", min=1)] = 5,
    evaluator: Annotated[
        str | None,
        typer.Option(
            "--evaluator",
            envvar="LORATUNE_EVALUATOR_ADDRESS",
            help="Evaluator address host:port; none = evaluate in this process.",
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the full result as JSON.")
    ] = Path("evaluation_results.json"),
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait.")] = 600.0,
) -> None:
    """Score predictions against references; print a table and write the result as JSON.

    Files hold one item a line, a JSON list (.json), or one JSON value a line (.jsonl).
    """
    request = evaluator_pb2.EvaluateRequest(
        task_type=(
            common_pb2.TASK_TYPE_CLASSIFICATION
            if task is Task.classification
            else common_pb2.TASK_TYPE_GENERATION
        ),
        predictions=_read(predictions, "--predictions"),
        references=_read(references, "--references"),
        prompts=_read(prompts, "--prompts"),
        labels=_read(labels, "--labels"),
    )
    if judge is not None:
        request.judge.enabled = True
        request.judge.judge_model_id = judge
        request.judge.sample_size = judge_sample_size
    result = run_rpc(
        _evaluate_remote(evaluator, request, timeout) if evaluator else _evaluate_local(request)
    )
    render_evaluation(console, result)
    output.write_text(
        json.dumps(json_format.MessageToDict(result), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    console.print(f"full result written to {output}")


trainer_commands.register(app, serve_app)
optimizer_commands.register(app, serve_app)
project_commands.register(app)


def main() -> None:
    """Console entry point."""
    sys.exit(app())


if __name__ == "__main__":
    main()
