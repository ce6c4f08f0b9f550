"""Trainer discovery against a fake Kubernetes API server that answers real Pod list JSON."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from services.optimizer.core.pool import TrainerPool
from services.optimizer.core.ports import TrainerState
from services.optimizer.kubernetes import BUSY_COST, DELETION_COST, IDLE_COST, KubernetesTrainers


def pod(
    name: str, ip: str, ready: bool, phase: str = "Running", deleting: bool = False
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "labels": {"app.kubernetes.io/component": "trainer"},
    }
    if deleting:
        metadata["deletionTimestamp"] = "2026-11-21T06:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "trainer", "image": "loratune:latest"}]},
        "status": {
            "phase": phase,
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeKubernetes(BaseHTTPRequestHandler):
    pods: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[tuple[str, dict[str, list[str]]]]] = []
    patches: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.requests.append((url.path, parse_qs(url.query)))
        if url.path != "/api/v1/namespaces/ml/pods":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": {"resourceVersion": "1"},
                "items": self.pods,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PATCH(self) -> None:
        # As the API server does: a JSON merge patch of one pod's metadata (other patch
        # types would need other bodies), the patched pod in the answer.
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.patches.append((url.path, self.headers["Content-Type"], body))
        name = url.path.rsplit("/", 1)[-1]
        found = [p for p in self.pods if p["metadata"]["name"] == name]
        if self.headers["Content-Type"] != "application/merge-patch+json" or not found:
            self.send_response(415 if found else 404)
            self.end_headers()
            return
        metadata = found[0]["metadata"]
        for key, value in body.get("metadata", {}).get("annotations", {}).items():
            annotations = metadata.setdefault("annotations", {})
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        answer = json.dumps(found[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api() -> Iterator[client.CoreV1Api]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKubernetes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield client.CoreV1Api(client.ApiClient(configuration))
    server.shutdown()


async def test_ready_running_pods_only(api: client.CoreV1Api) -> None:
    FakeKubernetes.pods = [
        pod("trainer-0", "10.1.0.4", ready=True),
        pod("trainer-1", "10.1.0.5", ready=False),
        pod("trainer-2", "10.1.0.6", ready=True, phase="Pending"),
        pod("trainer-3", "10.1.0.7", ready=True, deleting=True),
        pod("trainer-4", "10.1.0.3", ready=True),
    ]
    FakeKubernetes.requests = []
    discovery = KubernetesTrainers("ml", "app.kubernetes.io/component=trainer", 50052, api=api)
    assert await discovery.addresses() == ["10.1.0.3:50052", "10.1.0.4:50052"]
    path, query = FakeKubernetes.requests[-1]
    assert path == "/api/v1/namespaces/ml/pods"
    assert query["labelSelector"] == ["app.kubernetes.io/component=trainer"]


async def test_api_down_means_no_trainers_not_a_crash() -> None:
    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"
    api = client.CoreV1Api(client.ApiClient(configuration))
    discovery = KubernetesTrainers("ml", "x=y", 50052, api=api)
    assert await discovery.addresses() == []


def _cost(name: str) -> str | None:
    found = next(p for p in FakeKubernetes.pods if p["metadata"]["name"] == name)
    return found["metadata"].get("annotations", {}).get(DELETION_COST)


class Trainers:
    """Trainer status as GetTrainerStatus answers it: busy or idle by address."""

    def __init__(self, busy: set[str]) -> None:
        self.busy = busy

    async def status(self, address: str) -> TrainerState | None:
        return TrainerState(busy=address in self.busy)


async def test_scale_in_spares_busy_trainers_through_their_deletion_cost(
    api: client.CoreV1Api,
) -> None:
    # Three ready trainers; one runs another client's job. The pool hands one out.
    FakeKubernetes.pods = [
        pod("trainer-a", "10.1.0.1", ready=True),
        pod("trainer-b", "10.1.0.2", ready=True),
        pod("trainer-c", "10.1.0.3", ready=True),
    ]
    FakeKubernetes.patches = []
    discovery = KubernetesTrainers("ml", "app.kubernetes.io/component=trainer", 50052, api=api)
    pool = TrainerPool(discovery, Trainers(busy={"10.1.0.3:50052"}))  # type: ignore[arg-type]
    chosen = await pool.acquire()
    assert chosen == "10.1.0.1:50052"
    assert [_cost("trainer-a"), _cost("trainer-b"), _cost("trainer-c")] == [
        BUSY_COST,
        IDLE_COST,
        BUSY_COST,
    ]
    assert {path for path, _, _ in FakeKubernetes.patches} == {
        f"/api/v1/namespaces/ml/pods/trainer-{x}" for x in "abc"
    }
    # What the ReplicaSet controller removes first on a scale-in: the lowest cost.
    first_out = min(FakeKubernetes.pods, key=lambda p: int(_cost(p["metadata"]["name"]) or 0))
    assert first_out["metadata"]["name"] == "trainer-b"
    # Nothing changed: no patch. The job ends: its trainer is idle again at once.
    before = len(FakeKubernetes.patches)
    assert await pool.acquire() == "10.1.0.2:50052"  # b is now handed out (busy)
    assert len(FakeKubernetes.patches) == before + 1 and _cost("trainer-b") == BUSY_COST
    pool.release(chosen)
    for _ in range(100):
        if _cost("trainer-a") == IDLE_COST:
            break
        await asyncio.sleep(0.01)
    assert _cost("trainer-a") == IDLE_COST


async def test_a_refused_patch_is_logged_and_discovery_goes_on(
    api: client.CoreV1Api, caplog: pytest.LogCaptureFixture
) -> None:
    FakeKubernetes.pods = [pod("trainer-a", "10.1.0.1", ready=True)]
    discovery = KubernetesTrainers("ml", "x=y", 50052, api=api)
    assert await discovery.addresses() == ["10.1.0.1:50052"]
    FakeKubernetes.pods = []  # gone before the patch: 404
    await discovery.mark("10.1.0.1:50052", busy=True)
    assert "could not annotate trainer pod trainer-a" in caplog.text
    await discovery.mark("10.9.9.9:50052", busy=True)  # never listed: nothing to do
