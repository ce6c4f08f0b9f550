"""Trainer discovery against a fake Kubernetes API server that answers real Pod list JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from services.optimizer.kubernetes import KubernetesTrainers


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
