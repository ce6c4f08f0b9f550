"""The web console over real sockets: an optimizer servicer on a gRPC port, the console on HTTP."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from pydantic import SecretStr

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.errors import NotFound
from services.common.server import RunningServer, ServiceDefinition, start_server
from services.console.main import serve_console

TOKEN = "console-test-token-5f2a"


def _trial(number: int, state: int, objective: float | None, **kw: Any) -> optimizer_pb2.Trial:
    trial = optimizer_pb2.Trial(
        number=number,
        state=state,
        hyperparameters=common_pb2.Hyperparameters(
            lora=common_pb2.LoraParams(rank=8, alpha=16, dropout=0.05),
            training=common_pb2.TrainingParams(learning_rate=3e-4, num_epochs=2),
            balancing=common_pb2.BalancingParams(focal_gamma=2.0, use_class_weights=True),
        ),
        trainer="10.0.0.7:50052",
        **kw,
    )
    if objective is not None:
        trial.objective = objective
    return trial


def _studies() -> dict[str, tuple[optimizer_pb2.Study, list[optimizer_pb2.Trial]]]:
    best = _trial(1, optimizer_pb2.TRIAL_STATE_COMPLETE, 0.8854)
    done = optimizer_pb2.Study(
        study_id="payments",
        project_id=7,
        state=optimizer_pb2.STUDY_STATE_COMPLETED,
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name="Qwen/Qwen3-0.6B", n_trials=5
        ),
        dataset=common_pb2.DatasetSpec(
            uri="/data/платежи.csv", task_type=common_pb2.TASK_TYPE_CLASSIFICATION
        ),
        trials_complete=3,
        trials_pruned=2,
        best_trial=best,
        best_model_dir="/data/runs/models/payments",
        objective_name="f1_macro",
        excluded_classes=[common_pb2.ExcludedClass(label="91", train_rows=3, validation_rows=1)],
        excluded_note="1 classes not trained on: 91 (3 train / 1 validation rows). <i>misses</i>",
    )
    best.best_epoch = 1
    best.epoch_objectives[:] = [0.8854, 0.87]
    best.interruptions[:] = ["trainer 10.0.0.7:50052 shut down: SIGTERM"]
    running = optimizer_pb2.Study(
        study_id="<script>alert(1)</script>",
        project_id=8,
        state=optimizer_pb2.STUDY_STATE_RUNNING,
        fine_tuning_params=optimizer_pb2.FineTuningParams(base_model_name="m", n_trials=10),
        trials_running=1,
        objective_name="combined",
    )
    return {
        "payments": (
            done,
            [
                _trial(0, optimizer_pb2.TRIAL_STATE_PRUNED, 0.61),
                best,
                _trial(
                    2,
                    optimizer_pb2.TRIAL_STATE_FAIL,
                    None,
                    failure_reason="trainer lost <b>mid-trial</b>",
                    attempt=2,
                ),
            ],
        ),
        running.study_id: (running, [_trial(0, optimizer_pb2.TRIAL_STATE_RUNNING, None)]),
    }


class FakeOptimizer(optimizer_pb2_grpc.OptimizerServiceServicer):
    """The read side of OptimizerService, over fixed studies."""

    def __init__(self) -> None:
        self.studies = _studies()
        self.calls: list[str] = []

    async def ListStudies(self, request: Any, context: Any) -> Any:
        self.calls.append(f"ListStudies({request.project_id})")
        return optimizer_pb2.ListStudiesResponse(
            studies=[
                s
                for s, _ in self.studies.values()
                if not request.project_id or s.project_id == request.project_id
            ]
        )

    def _get(self, study_id: str) -> tuple[optimizer_pb2.Study, list[optimizer_pb2.Trial]]:
        if study_id not in self.studies:
            raise NotFound(f"study {study_id!r} not found")
        return self.studies[study_id]

    async def GetStudy(self, request: Any, context: Any) -> Any:
        return optimizer_pb2.GetStudyResponse(study=self._get(request.study_id)[0])

    async def ListTrials(self, request: Any, context: Any) -> Any:
        return optimizer_pb2.ListTrialsResponse(trials=self._get(request.study_id)[1])


class Console:
    def __init__(self, fake: FakeOptimizer, server: RunningServer | None, base: str) -> None:
        self.fake, self.server, self.base = fake, server, base

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base, timeout=20) as client:
            return await client.get(path)


@pytest.fixture
async def start_console() -> AsyncIterator[Callable[..., Any]]:
    stops: list[tuple[asyncio.Event, asyncio.Task[None], RunningServer | None]] = []

    async def start(
        *,
        optimizer_up: bool = True,
        server_token: str | None = None,
        client_token: str | None = None,
    ) -> Console:
        fake = FakeOptimizer()
        server = None
        if optimizer_up:
            definition = ServiceDefinition(
                full_name="loratune.optimizer.v1.OptimizerService",
                register=lambda s: optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server(
                    fake, s
                ),
            )
            common = CommonSettings(auth_token=SecretStr(server_token) if server_token else None)
            server = await start_server([definition], common, host="127.0.0.1", metrics_port=None)
            address = server.address
        else:
            with socket.socket() as s:  # bound, never listening: connections are refused
                s.bind(("127.0.0.1", 0))
                address = f"127.0.0.1:{s.getsockname()[1]}"
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        client = ClientSettings(token=client_token, default_timeout=5.0, max_attempts=1)
        task = asyncio.create_task(
            serve_console(
                address, host="127.0.0.1", port=0, client=client, started=started, stop=stop
            )
        )
        port = await asyncio.wait_for(started, 20)
        stops.append((stop, task, server))
        return Console(fake, server, f"http://127.0.0.1:{port}")

    yield start
    for stop, task, server in stops:
        stop.set()
        await asyncio.wait_for(task, 20)
        if server is not None:
            await server.stop(1)


async def test_the_studies_page_lists_every_study_escaped(start_console: Any) -> None:
    console = await start_console()
    page = await console.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "<a href='/studies/payments'>payments</a>" in text
    assert "5 / 5" in text and "0.8854 (#1)" in text and "Qwen/Qwen3-0.6B" in text
    # A study id is text, never markup.
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # A running study on the page: it refreshes itself.
    assert "http-equiv='refresh'" in text
    one_project = await console.get("/?project=7")
    assert "payments" in one_project.text and "alert" not in one_project.text
    assert "http-equiv='refresh'" not in one_project.text  # nothing running there
    assert console.fake.calls == ["ListStudies(0)", "ListStudies(7)"]
    bad = await console.get("/?project=seven")
    assert bad.status_code == 400 and "project must be an integer" in bad.text


async def test_a_study_page_shows_its_trials_and_best_adapter(start_console: Any) -> None:
    console = await start_console()
    page = await console.get("/studies/payments")
    assert page.status_code == 200
    text = page.text
    assert "/data/платежи.csv" in text and "/data/runs/models/payments" in text
    assert "3 complete, 2 pruned, 0 failed, 0 running of 5" in text
    rows = re.findall(r"<tr(?: class=best)?><td class='n'>(\d+)</td>", text)
    assert rows == ["0", "1", "2"]
    assert "<tr class=best><td class='n'>1</td>" in text
    assert "<td class='n'>0.8854</td>" in text and "<th>focal γ</th>" in text
    assert "trainer lost &lt;b&gt;mid-trial&lt;/b&gt;; attempt 2" in text
    # The classes left out, and which epoch a trial kept and why it ran again, are shown.
    assert "left out of training" in text and "&lt;i&gt;misses&lt;/i&gt;" in text
    assert "kept epoch 1 of 2" in text and "re-run after: trainer 10.0.0.7:50052 shut down" in text
    assert "http-equiv='refresh'" not in text  # completed: nothing changes any more


async def test_the_json_api_is_the_optimizers_messages(start_console: Any) -> None:
    console = await start_console()
    listing = (await console.get("/api/studies")).json()
    assert [s["study_id"] for s in listing["studies"]] == list(console.fake.studies)
    one = await console.get("/api/studies/payments")
    assert one.status_code == 200
    study, _ = console.fake.studies["payments"]
    expected = MessageToDict(
        study, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert one.json()["study"] == expected
    assert [t["number"] for t in one.json()["trials"]] == [0, 1, 2]


async def test_an_unknown_study_is_404_with_the_optimizers_message(start_console: Any) -> None:
    console = await start_console()
    page = await console.get("/studies/nope")
    assert page.status_code == 404 and "study &#x27;nope&#x27; not found" in page.text
    api = await console.get("/api/studies/nope")
    assert api.status_code == 404
    assert api.json() == {"error": "study 'nope' not found", "code": "NOT_FOUND"}
    assert (await console.get("/healthz")).text == "ok"


async def test_an_unreachable_optimizer_is_503_and_the_console_keeps_serving(
    start_console: Any,
) -> None:
    console = await start_console(optimizer_up=False)
    page = await console.get("/")
    assert page.status_code == 503 and "cannot be reached" in page.text
    api = await console.get("/api/studies")
    assert api.status_code == 503 and api.json()["code"] == grpc.StatusCode.UNAVAILABLE.name
    assert (await console.get("/healthz")).status_code == 200


async def test_the_token_is_sent_and_a_wrong_one_is_reported_without_leaking(
    start_console: Any,
) -> None:
    good = await start_console(server_token=TOKEN, client_token=TOKEN)
    assert (await good.get("/")).status_code == 200
    wrong = await start_console(server_token=TOKEN, client_token="not-the-token")
    page = await wrong.get("/studies/payments")
    assert page.status_code == 502 and "credentials" in page.text
    assert TOKEN not in page.text and "not-the-token" not in page.text


def test_the_console_command_needs_an_optimizer_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    monkeypatch.delenv("LORATUNE_OPTIMIZER_ADDRESS", raising=False)
    result = CliRunner().invoke(app, ["console", "--port", "0"])
    assert result.exit_code == 2
    assert "LORATUNE_OPTIMIZER_ADDRESS" in result.output
    assert "--optimizer" in CliRunner().invoke(app, ["console", "--help"]).output
