"""The four services in one process: what `loratune up` serves and `loratune tune` starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.logging import configure_logging
from services.common.server import (
    RunningServer,
    ServiceDefinition,
    serve_until_signal,
    start_server,
)
from services.common.threads import configure_torch_threads

if TYPE_CHECKING:
    from services.console.main import RunningConsole

__all__ = ["LocalStack", "StackOptions", "embedded_stack", "serve_stack"]

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class StackOptions:
    """Where the embedded services listen and keep their state.

    Ports 0 bind free ports. ``metrics_port_base`` None serves no metrics; otherwise the
    optimizer, trainer, evaluator and judge gateway serve them on base, base+1, base+2
    and base+3 (0 = each a free port). ``trainers`` > 1 starts more trainers on free ports.
    ``console_port`` is the web console's, where the stack serves one (`loratune up`).
    """

    host: str = "127.0.0.1"
    optimizer_port: int = 0
    trainer_port: int = 0
    evaluator_port: int = 0
    judge_port: int = 0
    metrics_port_base: int | None = None
    artifact_root: Path = Path("./runs")
    trainers: int = 1
    console_port: int = 0


class LocalStack:
    """Judge gateway, evaluator, trainer(s) and optimizer, each its own gRPC server here.

    The optimizer reaches the others over gRPC exactly as in a cluster; only the
    addresses are loopback ones. ``client`` is how to call them (and how they call
    each other). With ``with_console`` the web console runs in front of the optimizer too.
    """

    def __init__(
        self,
        options: StackOptions,
        common: CommonSettings,
        client: ClientSettings,
        *,
        with_console: bool = False,
    ) -> None:
        self.options = options
        self.client = client
        self._common = common
        self._with_console = with_console
        self.servers: dict[str, RunningServer] = {}
        self.trainers: list[RunningServer] = []
        self.console: RunningConsole | None = None
        self.storage_url = ""

    def _metrics_port(self, offset: int) -> int | None:
        base = self.options.metrics_port_base
        if base is None:
            return None
        return 0 if base == 0 else base + offset

    def _dial(self, server: RunningServer) -> str:
        """The address to call a server on: a wildcard bind is reached over loopback."""
        host = "127.0.0.1" if server.host in WILDCARD_HOSTS else server.host
        return f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"

    @property
    def optimizer_address(self) -> str:
        """Where clients reach the optimizer."""
        return self._dial(self.servers["optimizer"])

    async def start(self) -> None:
        """Starts the four services; on a failure stops the ones already started."""
        try:
            await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> None:
        # The services' heavy imports (torch, transformers, optuna) wait until a stack starts.
        from services.common.defaults import TrainingDefaults
        from services.evaluator.config import EvaluatorSettings
        from services.evaluator.main import build_evaluator
        from services.evaluator.main import service_definition as evaluator_definition
        from services.judge_gateway.config import JudgeSettings
        from services.judge_gateway.main import build_gateway
        from services.judge_gateway.main import service_definition as judge_definition
        from services.optimizer.config import OptimizerSettings
        from services.optimizer.main import build_optimizer
        from services.optimizer.main import service_definition as optimizer_definition
        from services.trainer.config import TrainerSettings
        from services.trainer.main import build_manager
        from services.trainer.main import service_definition as trainer_definition

        o = self.options
        root = o.artifact_root.resolve()
        defaults = TrainingDefaults()

        async def serve(
            name: str, definition: ServiceDefinition, port: int, offset: int
        ) -> RunningServer:
            server = await start_server(
                [definition],
                self._common,
                host=o.host,
                port=port,
                metrics_port=self._metrics_port(offset),
            )
            self.servers[name] = server
            return server

        judge = await serve(
            "judge gateway", judge_definition(build_gateway(JudgeSettings())), o.judge_port, 3
        )
        trainer_settings = TrainerSettings(artifact_root=root)
        for i in range(max(o.trainers, 1)):
            definition = trainer_definition(
                build_manager(trainer_settings), trainer_settings, defaults
            )
            if i == 0:
                self.trainers.append(await serve("trainer", definition, o.trainer_port, 1))
                continue
            # More trainers take free ports and no metrics port: the process has one
            # registry, which every metrics port already serves.
            server = await start_server(
                [definition], self._common, host=o.host, port=0, metrics_port=None
            )
            self.servers[f"trainer {i + 1}"] = server
            self.trainers.append(server)
        evaluator_settings = EvaluatorSettings(judge_address=self._dial(judge))
        await serve(
            "evaluator",
            evaluator_definition(build_evaluator(evaluator_settings, self.client)),
            o.evaluator_port,
            2,
        )
        settings = OptimizerSettings(
            trainers=",".join(self._dial(t) for t in self.trainers),
            evaluator_address=self._dial(self.servers["evaluator"]),
            judge_address=self._dial(judge),
            artifact_root=root,
        )
        self.storage_url = settings.storage()
        optimizer, channels = build_optimizer(settings, defaults, self.client)
        await serve("optimizer", optimizer_definition(optimizer, channels), o.optimizer_port, 0)
        if self._with_console:
            from services.console.config import ConsoleSettings
            from services.console.main import start_console

            token = self._common.auth_token
            self.console = await start_console(
                ConsoleSettings(
                    optimizer_address=self.optimizer_address,
                    judge_address=self._dial(judge),
                    host=o.host,
                ),
                port=o.console_port,
                client=self.client,
                auth_token=token.get_secret_value() if token is not None else None,
            )

    @property
    def console_url(self) -> str | None:
        """The web console's projects page, where the stack serves a console."""
        if self.console is None:
            return None
        host = "127.0.0.1" if self.options.host in WILDCARD_HOSTS else self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.console.port}/projects"

    def table(self) -> Table:
        """The services' addresses, optimizer first."""
        table = Table(title="loratune services")
        for column in ("service", "gRPC address", "metrics"):
            table.add_column(column)
        order = ["optimizer", *(n for n in self.servers if n.startswith("trainer"))]
        order += ["evaluator", "judge gateway"]
        for name in order:
            server = self.servers.get(name)
            if server is None:
                continue
            metrics = (
                f"http://{self._dial(server).rsplit(':', 1)[0]}:{server.metrics_port}/metrics"
                if server.metrics_port is not None
                else "-"
            )
            table.add_row(name, self._dial(server), metrics)
        return table

    async def stop(self, grace: float | None = None) -> None:
        """Stops the console and the optimizer first (its studies stay resumable), then the
        others."""
        console, self.console = self.console, None
        if console is not None:
            await console.stop()
        optimizer = self.servers.pop("optimizer", None)
        if optimizer is not None:
            await optimizer.stop(grace)
        others = list(self.servers.values())
        self.servers.clear()
        await asyncio.gather(*(s.stop(grace) for s in others), return_exceptions=True)


async def serve_stack(options: StackOptions, console: Console) -> int:
    """`loratune up`: the stack until SIGTERM / SIGINT, with the addresses printed.

    The settings come from the environment (token, TLS, reflection, grace period), as for
    any service; the signal handling is the services' own (``serve_until_signal``).
    """
    common = CommonSettings()
    configure_torch_threads(common.torch_threads)  # the trainer's and the evaluator's pool
    stack = LocalStack(options, common, ClientSettings.from_env(), with_console=True)

    async def start() -> LocalStack:
        await stack.start()
        return stack

    def announce(started: LocalStack) -> None:
        console.print(started.table())
        console.print(f"storage: {started.storage_url}")
        console.print(f"artifacts: {options.artifact_root.resolve()}")
        if started.console_url is not None:
            console.print(f"web console: {started.console_url}")
        console.print(
            f"submit a study: loratune tune --optimizer {started.optimizer_address} "
            "--dataset FILE --task classification   (Ctrl-C stops all services)"
        )

    return await serve_until_signal(start, started=announce)


def _quiet_libraries() -> None:
    """Keeps transformers' progress bars off the study's live display.

    Its misleading messages are filtered where logging is configured (`quiet_library_noise`
    in services/common/logging.py); its other warnings still show.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def embedded_stack(options: StackOptions, console: Console) -> AsyncIterator[LocalStack]:
    """`loratune tune` without an optimizer: a stack private to this command, then stopped.

    It serves no token, TLS or reflection even where the environment configures them for
    other servers, and logs only warnings so that the study's progress stays readable.
    """
    configure_logging("plain", "WARNING")
    _quiet_libraries()
    common = CommonSettings(
        reflection=False, auth_token=None, tls_cert=None, tls_key=None, tls_client_ca=None
    )
    stack = LocalStack(options, common, ClientSettings())
    with console.status("starting the optimizer, trainer, evaluator and judge gateway"):
        await stack.start()
    try:
        yield stack
    finally:
        await stack.stop(5)
