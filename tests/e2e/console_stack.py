"""A console in front of a real optimizer and judge gateway, for the browser test.

The optimizer is the real core and servicer with fake trainers (a few milliseconds an
epoch, so a study of 20 trials ends in seconds) and a fake evaluator that answers with a
full classification evaluation: per-class metrics, a confusion matrix and a class left out.
Everything binds port 0 on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from pydantic import SecretStr

from loratune.common.v1 import common_pb2
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.console.config import ConsoleSettings
from services.console.main import start_console
from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.main import build_gateway
from services.judge_gateway.main import service_definition as judge_definition
from services.optimizer.api.convert import evaluation_from_proto, search_space_from_json
from services.optimizer.clients import Channels, GrpcJudgeCatalog, StaticTrainers
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.ports import Evaluation, EvaluationRequest, JobEvent, TrainerDiscovery
from services.optimizer.core.projects import ProjectCatalog
from services.optimizer.main import service_definition as optimizer_definition
from tests.unit.optimizer.test_optimizer_core import FakeTrainers

PROJECT_ID = 7
TOKEN = "console-browser-token-3d9a71"

PROJECTS = """
projects:
  - id: 7
    name: sentiment
    dataset: {uri: data/sentiment.jsonl, task_type: classification}
    base_model_name: tiny/classifier
    search_space: {rank: [4, 8], num_epochs: [2]}
"""


class PacedTrainers(FakeTrainers):
    """Fake trainers that take a little time an epoch, so the page sees trials run."""

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        async for event in super().watch(address, job_id):
            await asyncio.sleep(0.05)
            yield event


class ClassifyingEvaluator:
    """A classification evaluation whose F1 macro is the fake trainer's score."""

    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        value = float(request.predictions[0])
        good = round(10 * value)
        return evaluation_from_proto(
            common_pb2.EvaluationResult(
                task_type=common_pb2.TASK_TYPE_CLASSIFICATION,
                objective=value,
                objective_name="f1_macro",
                num_examples=20,
                classification=common_pb2.ClassificationMetrics(
                    accuracy=value,
                    f1_macro=value,
                    per_class=[
                        common_pb2.ClassMetrics(
                            label="pos", precision=value, recall=value, f1=value, support=10
                        ),
                        common_pb2.ClassMetrics(
                            label="neg", precision=value, recall=value, f1=value, support=10
                        ),
                    ],
                    confusion_matrix=common_pb2.ConfusionMatrix(
                        labels=["pos", "neg"], counts=[good, 10 - good, 10 - good, good]
                    ),
                ),
                excluded_classes=[
                    common_pb2.ExcludedClass(label="rare", train_rows=1, validation_rows=0)
                ],
                excluded_note="rare is left out of the macro average",
            )
        )


@dataclass
class ConsoleStack:
    """The console's base URL and the optimizer behind it."""

    base: str
    optimizer: Optimizer


@asynccontextmanager
async def console_stack(
    folder: Path,
    *,
    auth_token: str | None = None,
    discovery: TrainerDiscovery | None = None,
) -> AsyncIterator[ConsoleStack]:
    """The judge gateway, the optimizer and the console, stopped on exit; with
    ``auth_token``, every server requires it (LORATUNE_AUTH_TOKEN). With ``discovery``
    the optimizer finds its trainers there and studies wait for one (scale from zero)."""
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "sentiment.jsonl").write_text(
        "".join(
            json.dumps({"text": f"t{i}", "label": "pos" if i % 2 else "neg"}) + "\n"
            for i in range(20)
        )
    )
    (folder / "projects.yaml").write_text(PROJECTS)
    common = CommonSettings(auth_token=SecretStr(auth_token) if auth_token else None)
    gateway = build_gateway(
        JudgeSettings(models=None, default=""), {"GEMINI_API_KEY": "AIzaSy-console-e2e-key"}
    )
    judge = await start_server(
        [judge_definition(gateway)], common, host="127.0.0.1", metrics_port=None
    )
    channels = Channels(ClientSettings(token=auth_token, max_attempts=1))
    optimizer = Optimizer(
        storage=optuna.storages.InMemoryStorage(),
        trainers=PacedTrainers(epochs=2),
        discovery=discovery or StaticTrainers(["127.0.0.1:1"]),
        evaluator=ClassifyingEvaluator(),
        judges=GrpcJudgeCatalog(channels, judge.address),
        defaults=TrainingDefaults(),
        options=OptimizerOptions(
            artifact_root=folder / "runs", poll_seconds=0.01, wait_for_trainers=bool(discovery)
        ),
        projects=ProjectCatalog(folder / "projects.yaml", search_space_from_json),
    )
    server = await start_server(
        [optimizer_definition(optimizer, channels)], common, host="127.0.0.1", metrics_port=None
    )
    console = await start_console(
        ConsoleSettings(
            optimizer_address=server.address, judge_address=judge.address, host="127.0.0.1"
        ),
        port=0,
        client=ClientSettings(token=auth_token, max_attempts=1, default_timeout=10),
        auth_token=auth_token,
    )
    try:
        yield ConsoleStack(base=f"http://127.0.0.1:{console.port}", optimizer=optimizer)
    finally:
        await console.stop()
        await server.stop(0)
        await judge.stop(0)
        await channels.close()
