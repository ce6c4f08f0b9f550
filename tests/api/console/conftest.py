"""Fixtures: the console over real HTTP in front of a real optimizer and judge gateway.

See `harness.py` for the pieces; everything binds port 0 on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from pydantic import SecretStr

from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, start_server
from services.console.config import ConsoleSettings
from services.console.main import RunningConsole, start_console
from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.main import build_gateway
from services.judge_gateway.main import service_definition as judge_definition
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.clients import Channels, GrpcJudgeCatalog, StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.projects import ProjectCatalog
from services.optimizer.main import service_definition as optimizer_definition
from tests.api.console.harness import (
    TOKEN,
    HeldTrainers,
    Stack,
    refused_address,
    write_projects,
)
from tests.unit.optimizer.test_optimizer_core import FakeEvaluator


@pytest.fixture
async def make_stack(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts stacks: `auth` puts LORATUNE_AUTH_TOKEN on every server and the console;
    `judge` False leaves the console without a gateway; `optimizer_up` False points the
    console at an address that refuses connections."""
    servers: list[RunningServer] = []
    consoles: list[RunningConsole] = []
    channels: list[Channels] = []

    async def make(
        *,
        auth: bool = False,
        judge: bool = True,
        optimizer_up: bool = True,
        heartbeat_seconds: float = 15.0,
    ) -> Stack:
        common = CommonSettings(auth_token=SecretStr(TOKEN) if auth else None)
        gateway = build_gateway(
            JudgeSettings(models=None, default=""), {"GEMINI_API_KEY": "AIzaSy-console-tests-key"}
        )
        judge_server = await start_server(
            [judge_definition(gateway)], common, host="127.0.0.1", metrics_port=None
        )
        servers.append(judge_server)
        # The optimizer's own client of the gateway carries the token itself.
        own = Channels(ClientSettings(token=TOKEN if auth else None, max_attempts=1))
        channels.append(own)
        trainers = HeldTrainers()
        optimizer = Optimizer(
            storage=optuna.storages.InMemoryStorage(),
            trainers=trainers,
            discovery=StaticTrainers(["127.0.0.1:1"]),
            evaluator=FakeEvaluator(),
            judges=GrpcJudgeCatalog(own, judge_server.address),
            defaults=TrainingDefaults(),
            options=OptimizerOptions(artifact_root=tmp_path / "runs", poll_seconds=0.01),
            projects=ProjectCatalog(
                write_projects(tmp_path / f"config-{len(servers)}"), search_space_from_json
            ),
        )
        address = refused_address()
        if optimizer_up:
            optimizer_server = await start_server(
                [optimizer_definition(optimizer, own)], common, host="127.0.0.1", metrics_port=None
            )
            servers.append(optimizer_server)
            address = optimizer_server.address
        settings = ConsoleSettings(
            optimizer_address=address,
            judge_address=judge_server.address if judge else "",
            host="127.0.0.1",
            console_heartbeat_seconds=heartbeat_seconds,
        )
        # The console's channels carry no token of their own: with auth on, only the
        # caller's token, forwarded, lets a call through.
        console = await start_console(
            settings,
            port=0,
            metrics_port=0,
            client=ClientSettings(token=None, max_attempts=1, default_timeout=10),
            auth_token=TOKEN if auth else None,
        )
        consoles.append(console)
        return Stack(
            console=console,
            base=f"http://127.0.0.1:{console.port}",
            optimizer=optimizer,
            trainers=trainers,
            optimizer_address=address,
            token=TOKEN if auth else None,
        )

    yield make
    for console in consoles:
        await console.stop()
    for server in reversed(servers):
        await server.stop(0)
    for own in channels:
        await own.close()


@pytest.fixture
async def stack(make_stack: Callable[..., Any]) -> Stack:
    """A stack without auth."""
    return await make_stack()  # type: ignore[no-any-return]
