"""Optimizer commands of the CLI: up, demo-data, tune, studies, trials, watch, cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, run_rpc, usage_error
from services.cli.project_commands import task_label
from services.cli.stack import StackOptions, embedded_stack, serve_stack
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings
from services.common.durations import format_duration, parse_duration
from services.common.labels import (
    model_label,
    modules_label,
    study_state,
    trial_note,
    trial_state,
)
from services.common.logging import configure_logging

console = Console()
errors = Console(stderr=True)

TASKS = {
    "classification": common_pb2.TASK_TYPE_CLASSIFICATION,
    "generation": common_pb2.TASK_TYPE_GENERATION,
}
NO_ADDRESS = (
    "no optimizer address: pass --optimizer HOST:PORT or set LORATUNE_OPTIMIZER_ADDRESS "
    "(`loratune up` starts one)"
)

OptimizerOption = Annotated[
    str | None,
    typer.Option(
        "--optimizer",
        envvar="LORATUNE_OPTIMIZER_ADDRESS",
        help="Optimizer address host:port (env LORATUNE_OPTIMIZER_ADDRESS).",
    ),
]
StudyArgument = Annotated[str, typer.Argument(help="The study id.")]


# ---- small helpers -----------------------------------------------------------------------


def _require(address: str | None) -> str:
    if not address:
        raise usage_error(NO_ADDRESS)
    return address


def _ints(value: str, option: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0:
        raise usage_error(f"{option}: expected comma-separated whole numbers, not {value!r}")
    return numbers


def _float_range(value: str, option: str) -> optimizer_pb2.FloatRange:
    try:
        low, high = (float(v) for v in value.split(","))
    except ValueError:
        raise usage_error(f"{option}: expected LOW,HIGH, not {value!r}") from None
    return optimizer_pb2.FloatRange(low=low, high=high, log=True)


@contextlib.asynccontextmanager
async def _connect(
    address: str | None, stack_options: StackOptions | None = None
) -> AsyncIterator[optimizer_pb2_grpc.OptimizerServiceAsyncStub]:
    """A stub of the optimizer at `address`, or of a whole stack started here for the call."""
    if address:
        async with create_channel(address, ClientSettings.from_env()) as channel:
            yield optimizer_pb2_grpc.OptimizerServiceStub(channel)  # type: ignore[misc]
        return
    async with (
        embedded_stack(stack_options or StackOptions(), console) as stack,
        create_channel(stack.optimizer_address, stack.client) as channel,
    ):
        yield optimizer_pb2_grpc.OptimizerServiceStub(channel)  # type: ignore[misc]


# ---- rendering ---------------------------------------------------------------------------


def _key_params(trial: optimizer_pb2.Trial) -> str:
    h = trial.hyperparameters
    return (
        f"rank={h.lora.rank} lr={h.training.learning_rate:.2g} "
        f"epochs={h.training.num_epochs} {modules_label(h.lora.target_modules)}"
    )


def trials_table(study: optimizer_pb2.Study, trials: Sequence[optimizer_pb2.Trial]) -> Table:
    """One row a trial: state, the key hyperparameters, the objective (fits 80 columns)."""
    classification = study.dataset.task_type == common_pb2.TASK_TYPE_CLASSIFICATION
    objective = study.objective_name or "objective"
    caption = "* best, = #n: the result of trial n (same point, no job), rs = rsLoRA"
    if classification:
        caption += ", γ = focal gamma, cw = class weights, ws = weighted sampler"
    table = Table(
        title=f"Trials of {study.study_id}",
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    several_bases = bool(study.fine_tuning_params.base_model_names)
    columns = ["#", "state", *(["base"] if several_bases else []), "rank", "α", "lr", "ep"]
    columns.append("modules")
    if classification:
        columns += ["γ", "cw", "ws"]
    columns.append(objective)
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", objective) else "left")
    best = study.best_trial.number if study.best_trial.HasField("objective") else None
    for t in trials:
        h = t.hyperparameters
        row = [
            str(t.number) + ("*" if t.number == best else " "),
            # A repeat of a finished point: that trial's result, taken without a job.
            f"= #{t.same_as}" if t.HasField("same_as") else trial_state(t.state),
            *([_short_base(t.base_model)] if several_bases else []),
            str(h.lora.rank) + (" rs" if h.lora.use_rslora else ""),
            f"{h.lora.alpha:g}",
            f"{h.training.learning_rate:.1e}",
            str(h.training.num_epochs),
            modules_label(h.lora.target_modules),
        ]
        if classification:
            b = h.balancing
            row += [
                f"{b.focal_gamma:.1f}",
                "on" if b.use_class_weights else "-",
                "on" if b.use_weighted_sampler else "-",
            ]
        row.append(f"{t.objective:.4f}" if t.HasField("objective") else "-")
        table.add_row(*row)
    return table


def render_result(study: optimizer_pb2.Study, trials: Sequence[optimizer_pb2.Trial]) -> None:
    """The trials table, the study's outcome and where its best adapter is."""
    console.print(trials_table(study, trials))
    for trial in trials:
        note = trial_note(trial)
        if note:
            console.print(f"trial {trial.number}: {note}")
    state = study_state(study.state)
    counts = (
        f"{study.trials_complete} complete, {study.trials_pruned} pruned, "
        f"{study.trials_failed} failed"
        + (f", {study.trials_reused} repeats taken without a job" if study.trials_reused else "")
    )
    console.print(f"study {study.study_id}: {state} ({counts})")
    if study.end_note:
        console.print(f"[yellow]ended early:[/yellow] {study.end_note}")
    if study.waiting_reason:
        since = study.waiting_since.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        console.print(f"[yellow]{study.waiting_reason}[/yellow] (since {since} UTC)")
    if study.excluded_note:
        console.print(f"[yellow]left out of training:[/yellow] {study.excluded_note}")
    if study.failure_reason and state != "COMPLETED":
        console.print(f"[yellow]reason:[/yellow] {study.failure_reason}")
    if study.HasField("report"):
        for line in report_lines(study):
            console.print(line)
    elif study.best_trial.HasField("objective"):
        console.print(
            f"best: trial {study.best_trial.number}, "
            f"{study.objective_name} = {study.best_trial.objective:.4f}"
        )
    if study.best_model_dir:
        console.print(f"best adapter published to [bold]{study.best_model_dir}[/bold]")


def _short_base(name: str) -> str:
    """A base model's name for a table cell: its last path part, at most 16 characters."""
    label = model_label(name).split(" (")[0].rstrip("/").split("/")[-1]
    return label if len(label) <= 16 else label[:15] + "…"


def report_lines(study: optimizer_pb2.Study) -> list[str]:
    """What the study bought, on validation: floor, default, selected, noise, published."""
    r = study.report
    name = study.objective_name or "objective"
    lines = [f"what the study bought (validation {name}; no test data was read):"]
    if len(r.floors) > 1:
        for base_floor in r.floors:
            lines.append(
                f"  floor of {model_label(base_floor.base_model)}, trial {base_floor.trial}: "
                f"{base_floor.objective:.4f}"
            )
    if r.HasField("floor_trial"):
        lines.append(f"  floor (probe only), trial {r.floor_trial}: {r.floor_objective:.4f}")
    if r.HasField("default_trial"):
        lines.append(f"  default trial {r.default_trial}: {r.default_objective:.4f}")
    selected = (
        f"  selected, best of {r.trials_compared}: trial {r.selected_trial}: "
        f"{r.selected_objective:.4f}"
    )
    if r.HasField("noise"):
        selected += (
            f" (noise ±{r.noise:.4f}; the best of {r.candidates or r.trials_compared} "
            f"evaluations is ahead by ~{r.expected_optimism:.4f} by chance)"
        )
    lines.append(selected)
    if r.ensemble_trials:
        trials = ", ".join(str(n) for n in r.ensemble_trials)
        compared = (
            f" against the selected trial's {r.selected_macro_f1:.4f}"
            if r.HasField("selected_macro_f1")
            else ""
        )
        lines.append(
            f"  ensemble of each base's best and the floors (trials {trials}): macro-F1 "
            f"{r.ensemble_objective:.4f}{compared}"
        )
        if r.HasField("ensemble_cross_validated") and r.HasField("single_cross_validated"):
            lines.append(
                f"  cross-validated on validation halves: ensemble "
                f"{r.ensemble_cross_validated:.4f}, single model {r.single_cross_validated:.4f}"
            )
    is_floor = r.HasField("floor_trial") and r.published_trial == r.floor_trial
    if r.ensemble_published:
        lines.append(f"published: the ensemble of trials {', '.join(map(str, r.ensemble_trials))}")
    else:
        lines.append(f"published: trial {r.published_trial}" + (" (the floor)" if is_floor else ""))
    if r.warning:
        lines.append(f"[yellow]warning:[/yellow] {r.warning}")
    return lines


class StudyProgress:
    """What a study's event stream has said so far: trials done, best, running trials."""

    def __init__(self, study: optimizer_pb2.Study, trials: Sequence[optimizer_pb2.Trial]) -> None:
        self.study_id = study.study_id
        self.total = study.fine_tuning_params.n_trials
        self.objective_name = study.objective_name or "objective"
        self.states: dict[int, int] = {}
        self.objectives: dict[int, float] = {}
        self.running: dict[int, str] = {}
        self.final: optimizer_pb2.Study | None = None
        # Why no trial runs, while the study waits for a trainer ("" when it does not).
        self.waiting = study.waiting_reason
        for trial in trials:
            self._record(trial)

    def _record(self, trial: optimizer_pb2.Trial) -> None:
        if trial.HasField("same_as"):  # a repeat: no job, not counted toward n_trials
            self.states.pop(trial.number, None)
            self.running.pop(trial.number, None)
            return
        self.states[trial.number] = trial.state
        if trial.HasField("objective") and trial.state == optimizer_pb2.TRIAL_STATE_COMPLETE:
            self.objectives[trial.number] = trial.objective
        if trial.state == optimizer_pb2.TRIAL_STATE_RUNNING:
            self.running.setdefault(trial.number, "starting")
        else:
            self.running.pop(trial.number, None)

    @property
    def done(self) -> int:
        """Trials that count toward n_trials: complete and pruned."""
        finished = (optimizer_pb2.TRIAL_STATE_COMPLETE, optimizer_pb2.TRIAL_STATE_PRUNED)
        return sum(1 for s in self.states.values() if s in finished)

    def best_text(self) -> str:
        """'best 0.7312 (#2)', or 'no trial complete yet'."""
        if not self.objectives:
            return "no trial complete yet"
        number = max(self.objectives, key=lambda n: self.objectives[n])
        return f"best {self.objective_name} {self.objectives[number]:.4f} (#{number})"

    def running_text(self) -> str:
        """The running trials' epoch and loss; or why none runs."""
        if not self.running and self.waiting:
            return self.waiting
        return "; ".join(f"#{n} {text}" for n, text in sorted(self.running.items()))

    def apply(self, event: optimizer_pb2.StudyEvent) -> str | None:
        """Takes one event in; returns a line worth printing above the progress bar."""
        kind = event.WhichOneof("event")
        if kind == "study_waiting":
            self.waiting = event.study_waiting.reason
            since = event.study_waiting.since.ToDatetime().strftime("%H:%M:%S")
            return f"{self.waiting} (since {since} UTC)"
        if kind == "trial_started":
            trial = event.trial_started.trial
            self.waiting = ""
            self._record(trial)
            return f"trial {trial.number} started on {trial.trainer}: {_key_params(trial)}"
        if kind == "trial_progress":
            p = event.trial_progress
            self.running[p.number] = (
                f"epoch {p.epoch:.2f} step {p.step}/{p.total_steps} loss {p.loss:.4f}"
            )
            return None
        if kind == "trial_evaluated":
            e = event.trial_evaluated
            return (
                f"trial {e.number} epoch {e.epoch:.0f}: "
                f"{e.evaluation.objective_name or self.objective_name} "
                f"{e.evaluation.objective:.4f}"
            )
        if kind == "trial_finished":
            trial = event.trial_finished.trial
            self._record(trial)
            line = f"trial {trial.number} {trial_state(trial.state)}"
            if trial.HasField("objective"):
                line += f": {self.objective_name} {trial.objective:.4f}"
            if trial.failure_reason:
                line += f" ({trial.failure_reason})"
            return line
        if kind == "study_finished":
            self.final = event.study_finished.study
            best = self.final.best_trial
            if best.HasField("objective"):
                self.objectives.setdefault(best.number, best.objective)
            return None
        return None


# Trials asked per ListTrials page.
TRIAL_PAGE = 500


async def list_trials(
    stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub, study_id: str
) -> list[optimizer_pb2.Trial]:
    """Every trial of the study, a page of TRIAL_PAGE at a time, in the basic view (the
    tables show no per-class metrics or confusion matrices)."""
    trials: list[optimizer_pb2.Trial] = []
    token = ""
    while True:
        reply = await stub.ListTrials(
            optimizer_pb2.ListTrialsRequest(
                study_id=study_id,
                page_size=TRIAL_PAGE,
                page_token=token,
                view=optimizer_pb2.TRIAL_VIEW_BASIC,
            )
        )
        trials.extend(reply.trials)
        token = reply.next_page_token
        if not token:
            return trials


_FINAL_STATES = frozenset(
    {
        optimizer_pb2.STUDY_STATE_COMPLETED,
        optimizer_pb2.STUDY_STATE_FAILED,
        optimizer_pb2.STUDY_STATE_CANCELLED,
    }
)
# How long to wait between attempts to reach an optimizer that went away (it resumes its
# studies when it is back): doubling from the first to the last.
RECONNECT_SECONDS = (1.0, 30.0)


async def follow_study(
    stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub,
    study_id: str,
    *,
    reconnect: bool = False,
) -> optimizer_pb2.Study:
    """Shows a study's live progress until it finishes; returns the finished study.

    With ``reconnect`` (a remote optimizer), an optimizer that goes away (UNAVAILABLE, or
    its stream ending before the study does) is waited for and followed again: it resumes
    unfinished studies when it restarts, so the study's end, not the connection's, decides.
    """
    delay, longest = RECONNECT_SECONDS
    while True:
        try:
            final = await _follow_once(stub, study_id)
            if final.state in _FINAL_STATES or not reconnect:
                return final
        except grpc.aio.AioRpcError as err:
            if not reconnect or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        errors.print(
            f"lost the optimizer while following {study_id}; "
            f"following it again in {delay:.0f} s (the study goes on there)"
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest)


async def _follow_once(
    stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub, study_id: str
) -> optimizer_pb2.Study:
    study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_id))).study
    if study.state in _FINAL_STATES:
        return study
    trials = await list_trials(stub, study_id)
    state = StudyProgress(study, trials)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.completed}/{task.total} trials"),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[running]}"),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(
            study_id,
            total=state.total,
            completed=state.done,
            best=state.best_text(),
            running=state.running_text(),
        )
        async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id=study_id)):
            line = state.apply(event)
            if line:
                progress.console.print(line)
            progress.update(
                bar, completed=state.done, best=state.best_text(), running=state.running_text()
            )
            if state.final is not None:
                break
    if state.final is not None:
        return state.final
    # The stream ended without the final event (the optimizer went away): say where it is.
    return (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_id))).study


async def _finish(
    stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub, study_id: str, *, reconnect: bool = False
) -> optimizer_pb2.Study:
    """Follows the study to its end, then prints its trials table and outcome."""
    final = await follow_study(stub, study_id, reconnect=reconnect)
    trials = await list_trials(stub, study_id)
    render_result(final, trials)
    return final


def _exit_code(study: optimizer_pb2.Study) -> int:
    """0 when the study completed; 1 when it failed or was cancelled (its reason is shown)."""
    return 0 if study.state == optimizer_pb2.STUDY_STATE_COMPLETED else EXIT_FAILED


# ---- commands ----------------------------------------------------------------------------


def _class_table(rows: Sequence[tuple[str, str]]) -> tuple[Table, str]:
    counts = Counter(label for _, label in rows)
    table = Table(title="Classes")
    for column in ("label", "rows", "share"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, count in counts.most_common():
        table.add_row(label, str(count), f"{count / len(rows):.1%}")
    top_label, top = counts.most_common(1)[0]
    smallest = sorted(counts.items(), key=lambda kv: (kv[1], kv[0]))[:5]
    summary = (
        f"{len(rows)} rows, {len(counts)} classes; top class {top_label}: {top} rows "
        f"({top / len(rows):.1%}); smallest classes: "
        + ", ".join(f"{label} ({count})" for label, count in smallest)
    )
    return table, summary


def register(app: typer.Typer, serve_app: typer.Typer) -> None:
    """Adds the optimizer's user-facing commands to the `loratune` app."""
    del serve_app  # `serve optimizer` is registered with the other services' serve commands

    @app.command("up")
    def up(
        host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
        optimizer_port: Annotated[int, typer.Option("--optimizer-port")] = 50051,
        trainer_port: Annotated[int, typer.Option("--trainer-port")] = 50052,
        evaluator_port: Annotated[int, typer.Option("--evaluator-port")] = 50053,
        judge_port: Annotated[int, typer.Option("--judge-port")] = 50054,
        console_port: Annotated[
            int,
            typer.Option(
                "--console-port", help="The web console's port; 0 = a free one (printed)."
            ),
        ] = 0,
        metrics_port_base: Annotated[
            int,
            typer.Option(
                "--metrics-port-base",
                help="Metrics on base..base+3 (optimizer, trainer, evaluator, judge); -1 = off.",
            ),
        ] = 9091,
        artifact_root: Annotated[
            Path,
            typer.Option(
                "--artifact-root",
                envvar="LORATUNE_ARTIFACT_ROOT",
                help="Trial folders, published models and the SQLite storage.",
            ),
        ] = Path("./runs"),
    ) -> None:
        """Run all four services in this process on loopback until Ctrl-C / SIGTERM."""
        common = CommonSettings()
        configure_logging(common.log_format, common.log_level)
        options = StackOptions(
            host=host,
            optimizer_port=optimizer_port,
            trainer_port=trainer_port,
            evaluator_port=evaluator_port,
            judge_port=judge_port,
            console_port=console_port,
            metrics_port_base=None if metrics_port_base < 0 else metrics_port_base,
            artifact_root=artifact_root,
        )
        try:
            code = asyncio.run(serve_stack(options, console))
        except (RuntimeError, OSError) as err:
            # A port taken, a folder that cannot be written: the services cannot start.
            errors.print(f"[red]error:[/red] {err}")
            raise typer.Exit(EXIT_FAILED) from None
        raise typer.Exit(code)

    @app.command("demo-data")
    def demo_data(
        output: Annotated[Path, typer.Option("--output", "-o", help="CSV or JSONL file.")] = Path(
            "demo/payments.csv"
        ),
        seed: Annotated[int, typer.Option("--seed")] = 7,
        scale: Annotated[
            float, typer.Option("--scale", help="Multiplies the large classes' rows.", min=0.05)
        ] = 1.0,
    ) -> None:
        """Write the synthetic, long-tailed dataset of Russian payment comments."""
        from services.cli.demo_data import generate, write

        rows = generate(seed=seed, scale=scale)
        write(output, rows)
        table, summary = _class_table(rows)
        console.print(table)
        console.print(summary)
        console.print(f"wrote {output} (columns text, label)")

    @app.command("tune")
    def tune(
        dataset: Annotated[
            Path | None, typer.Option("--dataset", help="Training data, JSONL or CSV.")
        ] = None,
        task: Annotated[
            str | None, typer.Option("--task", help="classification or generation.")
        ] = None,
        project: Annotated[
            int | None,
            typer.Option(
                "--project",
                help="A project's study (`loratune projects`): its dataset and defaults.",
            ),
        ] = None,
        base_model: Annotated[
            list[str] | None,
            typer.Option(
                "--base-model",
                help="Hub name or folder; LORA_MODEL_NAME. Repeat it to search several bases "
                "(each base's floor runs first; the base is then a dimension of the search).",
            ),
        ] = None,
        n_trials: Annotated[
            int | None, typer.Option("--n-trials", help="5..100; default LORA_N_TRIALS.")
        ] = None,
        time_budget: Annotated[
            str | None,
            typer.Option(
                "--time-budget",
                help="Start no trial after this long (90m, 2h, 1h30m); the running ones "
                "finish. --n-trials stays the cap.",
            ),
        ] = None,
        judge: Annotated[
            str | None,
            typer.Option("--judge", help="Add this LLM judge to the objective (generation)."),
        ] = None,
        text_field: Annotated[str, typer.Option("--text-field")] = "",
        label_field: Annotated[str, typer.Option("--label-field")] = "",
        prompt_field: Annotated[str, typer.Option("--prompt-field")] = "",
        target_field: Annotated[str, typer.Option("--target-field")] = "",
        validation: Annotated[
            Path | None, typer.Option("--validation", help="Validation file; else a split.")
        ] = None,
        validation_fraction: Annotated[
            float,
            typer.Option("--validation-fraction", help="Split off for validation; 0 = 0.1."),
        ] = 0.0,
        project_id: Annotated[int, typer.Option("--project-id")] = 0,
        study_name: Annotated[
            str | None, typer.Option("--study-name", help="The same name again is idempotent.")
        ] = None,
        max_parallel: Annotated[
            int, typer.Option("--max-parallel", help="Trials at once; 0 = every idle trainer.")
        ] = 0,
        epochs: Annotated[
            str | None, typer.Option("--epochs", help="Epoch counts to search, e.g. 2,3.")
        ] = None,
        ranks: Annotated[
            str | None, typer.Option("--ranks", help="LoRA ranks to search, e.g. 8,16.")
        ] = None,
        learning_rate: Annotated[
            str | None, typer.Option("--learning-rate", help="LOW,HIGH, searched on a log scale.")
        ] = None,
        max_seq_length: Annotated[int, typer.Option("--max-seq-length")] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size")] = 0,
        sampler: Annotated[str, typer.Option("--sampler", help="tpe, random or gp.")] = "",
        pruner: Annotated[
            str, typer.Option("--pruner", help="median, hyperband, successive_halving, none.")
        ] = "",
        seed: Annotated[
            int | None, typer.Option("--seed", help="Seed of the validation split; 42.")
        ] = None,
        optimizer: OptimizerOption = None,
        artifact_root: Annotated[
            Path,
            typer.Option(
                "--artifact-root",
                help="Without --optimizer: where the embedded services keep their state.",
            ),
        ] = Path("./runs"),
        wait: Annotated[
            bool,
            typer.Option(
                "--wait/--no-wait",
                help="Follow the study to its end (exit 0 only if it completed; an optimizer "
                "that restarts is followed again), or submit it and exit (--optimizer only).",
            ),
        ] = True,
    ) -> None:
        """Search hyperparameters: submit a study and follow it to the best adapter.

        Without --optimizer (or LORATUNE_OPTIMIZER_ADDRESS) the four services start in this
        process for the study, as `loratune up` would, and stop when it ends (its projects
        come from LORATUNE_PROJECTS). With --project ID instead of --dataset / --task, the
        study takes the project's dataset, and its defaults for the options left out.
        """
        if not wait and not optimizer:
            raise usage_error(
                "--no-wait needs --optimizer (or LORATUNE_OPTIMIZER_ADDRESS): without one the "
                "study runs in this process and ends with it"
            )
        if project is not None:
            # The project's dataset is used as it is: options that describe another are refused.
            dataset_options = {
                "--dataset": dataset is not None,
                "--task": task is not None,
                "--text-field": bool(text_field),
                "--label-field": bool(label_field),
                "--prompt-field": bool(prompt_field),
                "--target-field": bool(target_field),
                "--validation": validation is not None,
                "--validation-fraction": bool(validation_fraction),
                "--seed": seed is not None,
                "--project-id": bool(project_id),
            }
            given = [name for name, present in dataset_options.items() if present]
            if given:
                raise usage_error(
                    f"--project uses the project's dataset; leave out {', '.join(given)} "
                    "(or pass --dataset and --task without --project)"
                )
            if project <= 0:
                raise usage_error(f"--project: expected a project id > 0, not {project}")
        elif dataset is None:
            raise usage_error(
                "pass --dataset FILE --task classification|generation, or --project ID "
                "(`loratune projects` lists them)"
            )
        elif task not in TASKS:
            raise usage_error(f"--task must be classification or generation, not {task!r}")
        if n_trials is not None and n_trials <= 0:
            # 0 on the wire means "the default"; the server checks every other value.
            raise usage_error(
                "fine_tuning_params.n_trials (--n-trials): "
                f"must be between 5 and 100 (got {n_trials})"
            )
        budget_seconds = 0
        if time_budget is not None:
            try:
                budget_seconds = parse_duration(time_budget)
            except ValueError as err:
                raise usage_error(f"--time-budget: {err}") from None
        request = optimizer_pb2.CreateStudyRequest(
            project_id=project or project_id,
            fine_tuning_params=optimizer_pb2.FineTuningParams(
                use_llm_judge=judge is not None,
                judge_model_id=judge or "",
                base_model_name=base_model[0] if base_model else "",
                base_model_names=list(base_model[1:]) if base_model else [],
                n_trials=n_trials or 0,
                time_budget_seconds=budget_seconds,
            ),
            max_parallel_trials=max(max_parallel, 0),
            study_name=study_name or "",
            sampler=sampler,
            pruner=pruner,
            training=common_pb2.TrainingParams(
                batch_size=max(batch_size, 0), max_seq_length=max(max_seq_length, 0)
            ),
        )
        if dataset is not None and task is not None:
            request.dataset.CopyFrom(
                common_pb2.DatasetSpec(
                    uri=str(dataset.resolve()),
                    task_type=TASKS[task],
                    text_field=text_field,
                    label_field=label_field,
                    prompt_field=prompt_field,
                    target_field=target_field,
                    validation_uri=str(validation.resolve()) if validation else "",
                    validation_fraction=validation_fraction,
                    seed=42 if seed is None else seed,
                )
            )
        if epochs:
            request.search_space.num_epochs.extend(_ints(epochs, "--epochs"))
        if ranks:
            request.search_space.rank.extend(_ints(ranks, "--ranks"))
        if learning_rate:
            request.search_space.learning_rate.CopyFrom(
                _float_range(learning_rate, "--learning-rate")
            )
        if batch_size:
            request.search_space.batch_size.append(batch_size)

        async def go() -> optimizer_pb2.Study:
            stack = None if optimizer else StackOptions(artifact_root=artifact_root)
            async with _connect(optimizer, stack) as stub:
                if project is not None:
                    await _project_defaults(stub, project, request, judge_given=judge is not None)
                created = (await stub.CreateStudy(request)).study
                budget = created.fine_tuning_params.time_budget_seconds
                bases = [
                    created.fine_tuning_params.base_model_name,
                    *created.fine_tuning_params.base_model_names,
                ]
                console.print(
                    f"study [bold]{created.study_id}[/bold]: "
                    f"{created.fine_tuning_params.n_trials} trials of "
                    f"{' | '.join(model_label(b) for b in bases)}"
                    + (f" within {format_duration(budget)}" if budget else "")
                    + f" ({study_state(created.state)})"
                )
                if stack is not None:
                    await _say_other_active(stub, created.study_id)
                if not wait:
                    console.print(f"submitted; follow it with `loratune watch {created.study_id}`")
                    return created
                return await _finish(stub, created.study_id, reconnect=stack is None)

        try:
            final = run_rpc(go())
        except KeyboardInterrupt:
            errors.print(
                "interrupted: the study stays in storage"
                + (
                    "; it goes on in the optimizer"
                    if optimizer
                    else f" and resumes with `loratune up --artifact-root {artifact_root}`"
                )
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise typer.Exit(_exit_code(final) if wait else 0)

    @app.command("studies")
    def studies(
        project_id: Annotated[int, typer.Option("--project-id", help="0 = every project.")] = 0,
        optimizer: OptimizerOption = None,
    ) -> None:
        """List studies, newest first."""
        address = _require(optimizer)

        async def go() -> list[optimizer_pb2.Study]:
            async with _connect(address) as stub:
                reply = await stub.ListStudies(
                    optimizer_pb2.ListStudiesRequest(project_id=project_id)
                )
                return list(reply.studies)

        found = run_rpc(go())
        if not found:
            console.print("no studies" + (f" of project {project_id}" if project_id else ""))
            return
        table = Table(title="Studies", box=box.SIMPLE_HEAD, show_edge=False)
        for column in ("study", "project", "state", "trials", "best", "created", "best adapter"):
            table.add_column(column)
        for s in found:
            n = s.fine_tuning_params.n_trials
            done = s.trials_complete + s.trials_pruned
            trials = f"{done}/{n}" + (f" ({s.trials_failed} failed)" if s.trials_failed else "")
            best = (
                f"{s.objective_name} {s.best_trial.objective:.4f} (#{s.best_trial.number})"
                if s.best_trial.HasField("objective")
                else "-"
            )
            created = s.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(
                s.study_id,
                str(s.project_id),
                study_state(s.state),
                trials,
                best,
                created,
                s.best_model_dir or "-",
            )
        console.print(table)

    @app.command("trials")
    def trials(study: StudyArgument, optimizer: OptimizerOption = None) -> None:
        """A study's trials: state, key hyperparameters, objective."""
        address = _require(optimizer)

        async def go() -> tuple[optimizer_pb2.Study, list[optimizer_pb2.Trial]]:
            async with _connect(address) as stub:
                found = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study))).study
                return found, await list_trials(stub, study)

        found, listed = run_rpc(go())
        render_result(found, listed)

    @app.command("watch")
    def watch(study: StudyArgument, optimizer: OptimizerOption = None) -> None:
        """Follow a study's live progress to its end, then print its trials."""
        address = _require(optimizer)

        async def go() -> optimizer_pb2.Study:
            async with _connect(address) as stub:
                return await _finish(stub, study, reconnect=True)

        try:
            final = run_rpc(go())
        except KeyboardInterrupt:
            errors.print("stopped watching; the study goes on")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise typer.Exit(_exit_code(final))

    @app.command("cancel")
    def cancel(study: StudyArgument, optimizer: OptimizerOption = None) -> None:
        """Cancel a queued or running study and its running jobs."""
        address = _require(optimizer)

        async def go() -> optimizer_pb2.Study:
            async with _connect(address) as stub:
                reply = await stub.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id=study))
                return reply.study

        cancelled = run_rpc(go())
        console.print(f"study {cancelled.study_id}: {study_state(cancelled.state)}")


async def _project_defaults(
    stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub,
    project_id: int,
    request: optimizer_pb2.CreateStudyRequest,
    judge_given: bool,
) -> None:
    """Says which project the study is of; without --judge, its judge on / off holds (the
    optimizer fills the other defaults, but reads an unset use_llm_judge as off)."""
    reply = await stub.GetProject(optimizer_pb2.GetProjectRequest(project_id=project_id))
    found = reply.project
    console.print(
        f"project [bold]{found.project_id}[/bold] {escape(found.name)}: "
        f"{task_label(found.dataset)} data {escape(found.dataset.uri)}"
    )
    if not judge_given:
        request.fine_tuning_params.use_llm_judge = found.use_llm_judge


async def _say_other_active(stub: optimizer_pb2_grpc.OptimizerServiceAsyncStub, mine: str) -> None:
    """Warns when studies of earlier runs resumed beside this one: they share the trainer."""
    reply = await stub.ListStudies(optimizer_pb2.ListStudiesRequest())
    active = (optimizer_pb2.STUDY_STATE_QUEUED, optimizer_pb2.STUDY_STATE_RUNNING)
    others = [s.study_id for s in reply.studies if s.state in active and s.study_id != mine]
    if others:
        console.print(
            f"[yellow]note:[/yellow] unfinished studies from earlier runs resumed too and share "
            f"the trainer: {', '.join(others)}"
        )
