"""The pieces of the console's test stack: a real optimizer and judge gateway behind it.

The optimizer is the real core and servicer on a gRPC port, with fake trainers (held until
a test lets them run) and a fake evaluator; the judge gateway is the real one, with a
Gemini key and no GigaChat credentials. Everything binds port 0 on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from services.console.main import RunningConsole
from services.optimizer.core.optimizer import Optimizer
from services.optimizer.core.ports import JobEvent
from tests.unit.optimizer.test_optimizer_core import FakeTrainers

TOKEN = "console-api-token-8c41e2"

PROJECTS = """
projects:
  - id: 123
    name: support
    dataset: {uri: data/support.jsonl, task_type: generation}
  - id: 124
    name: payments
    dataset: {uri: data/payments.jsonl, task_type: classification}
    base_model_name: org/model
    n_trials: 5
    search_space: {rank: [4], num_epochs: [1]}
"""


class HeldTrainers(FakeTrainers):
    """Fake trainers whose jobs wait at each epoch until `run` is set."""

    def __init__(self) -> None:
        super().__init__(epochs=1)
        self.run = asyncio.Event()

    async def watch(self, address: str, job_id: str) -> AsyncIterator[JobEvent]:
        await self.run.wait()
        async for event in super().watch(address, job_id):
            yield event


@dataclass
class Stack:
    """A console (`base` URL) in front of an optimizer and a judge gateway."""

    console: RunningConsole
    base: str
    optimizer: Optimizer
    trainers: HeldTrainers
    optimizer_address: str
    token: str | None

    def client(
        self, *, token: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.AsyncClient:
        """An HTTP client of the console, sending `token` as a bearer token if given."""
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.base, headers={**sent, **(headers or {})}, timeout=20
        )

    @property
    def metrics_url(self) -> str:
        """The console's Prometheus endpoint."""
        return f"http://127.0.0.1:{self.console.metrics_port}/metrics"


def write_projects(folder: Path) -> Path:
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "support.jsonl").write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8))
    )
    (data / "payments.jsonl").write_text(
        "".join(json.dumps({"text": f"t{i}", "label": f"l{i % 2}"}) + "\n" for i in range(8))
    )
    path = folder / "projects.yaml"
    path.write_text(PROJECTS)
    return path


def refused_address() -> str:
    """An address where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class OpenApi:
    """Validates real responses against the schemas of the console's OpenAPI document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str, str]] = set()

    def schema(self, path: str, method: str, status: int, media: str) -> dict[str, Any]:
        """The document's schema of a response, resolvable against its components."""
        response = self.document["paths"][path][method.lower()]["responses"][str(status)]
        content = response["content"][media]
        schema = content.get("x-sse-data", content["schema"])
        return {**schema, "components": self.document["components"]}

    def check(self, path: str, method: str, response: httpx.Response) -> Any:
        """`response`'s JSON, after validating it against the document (path as templated)."""
        body = response.json()
        schema = self.schema(path, method, response.status_code, "application/json")
        jsonschema.Draft202012Validator(schema).validate(body)
        self.checked.add((path, method.lower(), str(response.status_code)))
        return body

    def check_event(self, path: str, data: Any) -> None:
        """One event stream's `data:` against the document."""
        schema = self.schema(path, "get", 200, "text/event-stream")
        jsonschema.Draft202012Validator(schema).validate(data)
        self.checked.add((path, "get", "200"))

    def check_request(self, path: str, body: Any) -> None:
        """A request body against the document's request schema."""
        operation = self.document["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator(
            {**schema, "components": self.document["components"]}
        ).validate(body)
