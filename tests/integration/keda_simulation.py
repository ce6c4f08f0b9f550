"""A simulation of the trainers' autoscaling on one machine, with real processes.

What a cluster does, played by this harness:

- **Prometheus + KEDA + the HPA**: every `pollingInterval` it scrapes the optimizer's
  `/metrics` (adding `job="loratune-optimizer"` as the ServiceMonitor's scrape does),
  evaluates the ScaledObject's own `query` (read from the rendered manifest; the harness
  evaluates the subset it uses, a sum of `sum(selector)` terms, and refuses any other), and
  turns it into replicas as KEDA and the HPA do: `ceil(value / threshold)` up to
  `maxReplicaCount`; from zero only when the value exceeds `activationThreshold`; to zero
  only after `cooldownPeriod` without activity; an empty answer is an error
  (`ignoreNullValues: "false"`), which keeps the replicas and, after `failureThreshold`
  errors, holds `fallback.replicas` (never from zero); scale-up and scale-down follow the
  HPA behaviour's stabilisation window and pod policies.
- **The ReplicaSet controller**: scaling up starts a real `loratune serve trainer` process
  per pod (each on its own loopback address, 127.0.0.N, the pod IP); scaling in removes the
  pods it ranks first: not ready before ready, then the lowest
  `controller.kubernetes.io/pod-deletion-cost`, then the newest. A removed pod gets
  SIGTERM and a deletionTimestamp, and leaves the list when its process exits.
- **The kubelet's readiness probe and the API server**: a pod is Ready once its trainer's
  gRPC health answers SERVING; the pods are served to the optimizer's discovery as the
  Kubernetes API serves them (`GET .../pods`, `PATCH` merge patches of their annotations),
  over HTTP, used through the official `kubernetes` client.

Times in the manifest are multiplied by `time_scale` (0.02: a 900 s cooldown is 18 s).
Every scale-in records which pod went, whether it was busy (asked of the trainer itself,
GetTrainerStatus, at that moment) and whether an idle trainer existed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
NAMESPACE = "ml"
TRAINER_PORT = 50052
TRAINER_COMMAND = (sys.executable, "-m", "services.cli.main", "serve", "trainer")
LABELS = {"app.kubernetes.io/part-of": "loratune", "app.kubernetes.io/component": "trainer"}

_TERM = re.compile(r"^\s*sum\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*\)\s*$")
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|=)\s*"([^"]*)"\s*,?')


# ---- the ScaledObject's query over a scrape -------------------------------------------------


def _matchers(text: str) -> list[tuple[str, str, str]]:
    body = text.strip()[1:-1] if text else ""
    found, at = [], 0
    while at < len(body):
        match = _MATCHER.match(body, at)
        if match is None:
            raise ValueError(f"cannot read the label matchers {text!r}")
        found.append((match.group(1), match.group(2), match.group(3)))
        at = match.end()
    return found


def _matches(labels: Mapping[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        have = labels.get(name, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and re.fullmatch(value, have) is None:
            return False
    return True


def evaluate(query: str, samples: list[tuple[str, dict[str, str], float]]) -> float | None:
    """The query's value over `samples`; None where Prometheus answers an empty vector (a
    `sum` over no series is empty, and so is anything added to it)."""
    total = 0.0
    for term in query.split("+"):
        match = _TERM.match(term)
        if match is None:
            raise ValueError(f"the harness evaluates sums of sum(selector) only: {term!r}")
        matchers = _matchers(match.group(2) or "")
        values = [
            v
            for name, labels, v in samples
            if name == match.group(1) and _matches(labels, matchers)
        ]
        if not values:
            return None
        total += sum(values)
    return total


def scrape(url: str, job: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples at `url`, labelled with `job` as Prometheus's scrape labels them."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return [
        (sample.name, {**sample.labels, "job": job}, float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


# ---- the pods, the API server's view of them ------------------------------------------------


@dataclass
class Pod:
    """A trainer pod: its process, address and what the API server knows of it."""

    name: str
    ip: str
    process: subprocess.Popen[bytes]
    created: float
    ready_at: float | None = None
    deleting: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.ip}:{TRAINER_PORT}"

    @property
    def ready(self) -> bool:
        return self.ready_at is not None and not self.deleting

    def cost(self) -> int:
        try:
            return int(self.annotations.get(DELETION_COST, "0"))
        except ValueError:
            return 0

    def manifest(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": NAMESPACE,
            "labels": dict(LABELS),
            "annotations": dict(self.annotations),
        }
        if self.deleting:
            metadata["deletionTimestamp"] = "2026-12-07T00:00:00Z"
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {"containers": [{"name": "trainer", "image": "loratune"}]},
            "status": {
                "phase": "Running",
                "podIP": self.ip,
                "conditions": [{"type": "Ready", "status": "True" if self.ready else "False"}],
            },
        }


class ApiServer:
    """The pods' API: GET the namespace's pods, PATCH one pod's annotations (merge patch)."""

    def __init__(self, pods: list[Pod], lock: threading.Lock) -> None:
        self.pods, self.lock = pods, lock
        self.patches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if urlparse(self.path).path != f"/api/v1/namespaces/{NAMESPACE}/pods":
                    return self._answer(404, {"kind": "Status", "code": 404})
                with server.lock:
                    items = [p.manifest() for p in server.pods]
                self._answer(200, {"apiVersion": "v1", "kind": "PodList", "items": items})

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = urlparse(self.path).path.rsplit("/", 1)[-1]
                if self.headers["Content-Type"] != "application/merge-patch+json":
                    return self._answer(415, {"kind": "Status", "code": 415})
                with server.lock:
                    pod = next((p for p in server.pods if p.name == name), None)
                    if pod is None:
                        return self._answer(404, {"kind": "Status", "code": 404})
                    for key, value in body.get("metadata", {}).get("annotations", {}).items():
                        if value is None:
                            pod.annotations.pop(key, None)
                        else:
                            pod.annotations[key] = str(value)
                    server.patches += 1
                    manifest = pod.manifest()
                self._answer(200, manifest)

            def _answer(self, code: int, content: Any) -> None:
                data = json.dumps(content).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that points the official client at this server."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "sim", "cluster": {"server": self.url}}],
            "users": [{"name": "sim", "user": {"token": "simulated"}}],
            "contexts": [{"name": "sim", "context": {"cluster": "sim", "user": "sim"}}],
            "current-context": "sim",
        }
        path.write_text(json.dumps(config))
        return path

    def close(self) -> None:
        self._http.shutdown()


# ---- KEDA and the HPA -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    """The ScaledObject's settings that decide the replicas, times already scaled."""

    query: str
    threshold: float
    activation: float
    min_replicas: int
    max_replicas: int
    polling: float
    cooldown: float
    fallback_failures: int
    fallback_replicas: int
    up_window: float
    up_pods: int
    up_period: float
    down_window: float
    down_pods: int
    down_period: float

    @classmethod
    def from_manifest(cls, scaled_object: Mapping[str, Any], time_scale: float) -> Scaling:
        spec = scaled_object["spec"]
        (trigger,) = spec["triggers"]
        metadata = trigger["metadata"]
        if trigger["type"] != "prometheus" or trigger.get("metricType") != "AverageValue":
            raise ValueError("the harness plays a prometheus trigger of AverageValue")
        if metadata.get("ignoreNullValues") != "false":
            raise ValueError("the harness plays ignoreNullValues: false")
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        (up,) = behavior["scaleUp"]["policies"]
        (down,) = behavior["scaleDown"]["policies"]
        return cls(
            query=" ".join(metadata["query"].split()),
            threshold=float(metadata["threshold"]),
            activation=float(metadata.get("activationThreshold", 0)),
            min_replicas=int(spec.get("minReplicaCount", 0)),
            max_replicas=int(spec.get("maxReplicaCount", 100)),
            polling=float(spec.get("pollingInterval", 30)) * time_scale,
            cooldown=float(spec.get("cooldownPeriod", 300)) * time_scale,
            fallback_failures=int(spec["fallback"]["failureThreshold"]),
            fallback_replicas=int(spec["fallback"]["replicas"]),
            up_window=float(behavior["scaleUp"].get("stabilizationWindowSeconds", 0)) * time_scale,
            up_pods=int(up["value"]),
            up_period=float(up["periodSeconds"]) * time_scale,
            down_window=float(behavior["scaleDown"].get("stabilizationWindowSeconds", 300))
            * time_scale,
            down_pods=int(down["value"]),
            down_period=float(down["periodSeconds"]) * time_scale,
        )


@dataclass
class Removal:
    """One scale-in: the pod removed, and the trainers' states at that moment."""

    at: float
    pod: str
    busy: bool
    idle_existed: bool
    forced: bool


class Cluster:
    """The trainer Deployment, its pods as processes, and the autoscaler over them."""

    def __init__(
        self,
        scaling: Scaling,
        metrics_url: str,
        workdir: Path,
        env: Mapping[str, str],
    ) -> None:
        self.scaling = scaling
        self.metrics_url = metrics_url
        self.workdir = workdir
        self.env = dict(env)
        self.lock = threading.Lock()
        self.pods: list[Pod] = []
        self.api = ApiServer(self.pods, self.lock)
        self.replicas = 0
        self.removals: list[Removal] = []
        self.history: list[tuple[float, int, float | None]] = []  # (time, replicas, value)
        self.start_seconds: list[float] = []  # each trainer's spawn to SERVING
        self._serial = 0
        # Pod IPs 127.<subnet>.x.y: another run's on this machine use another subnet.
        self._subnet = 10 + os.getpid() % 240
        self._failures = 0
        self._last_active: float | None = None
        self._recommendations: list[tuple[float, int]] = []
        self._scaled: list[tuple[float, int]] = []  # (time, change) of each scaling step

    # -- pods --

    def _spawn(self) -> None:
        while True:  # a pod IP nothing answers on (a process of another run may linger)
            self._serial += 1
            ip = f"127.{self._subnet}.{self._serial // 250}.{self._serial % 250 + 1}"
            if not _serving(f"{ip}:{TRAINER_PORT}"):
                break
        name = f"loratune-trainer-{self._serial}"
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [*TRAINER_COMMAND, "--port", str(TRAINER_PORT), "--metrics-port", "-1"],
            env={**self.env, "LORATUNE_HOST": ip},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        with self.lock:
            self.pods.append(Pod(name=name, ip=ip, process=process, created=time.monotonic()))

    def _probe(self) -> None:
        """The kubelet: readiness by gRPC health; exited processes leave the list."""
        with self.lock:
            pods = list(self.pods)
        for pod in pods:
            if pod.process.poll() is not None:
                with self.lock:
                    self.pods.remove(pod)
                continue
            if pod.ready_at is None and not pod.deleting and _serving(pod.address):
                pod.ready_at = time.monotonic()
                self.start_seconds.append(pod.ready_at - pod.created)

    def _remove(self, forced: bool) -> None:
        """The ReplicaSet controller's choice: not ready first, then the lowest deletion
        cost, then the newest."""
        with self.lock:
            live = [p for p in self.pods if not p.deleting]
        if not live:
            return
        states = {p.name: _busy(p.address) if p.ready else None for p in live}
        victim = min(live, key=lambda p: (p.ready, p.cost(), -p.created))
        self.removals.append(
            Removal(
                at=time.monotonic(),
                pod=victim.name,
                busy=bool(states[victim.name]),
                idle_existed=any(s is False for s in states.values()),
                forced=forced,
            )
        )
        victim.deleting = True
        victim.process.send_signal(signal.SIGTERM)

    def live_pods(self) -> list[Pod]:
        with self.lock:
            return [p for p in self.pods if not p.deleting]

    def scale_in_now(self) -> None:
        """A scale-in from outside the autoscaler (`kubectl scale` to one pod less): the
        ReplicaSet removes a pod by its ranking; the HPA later scales back to its own
        count."""
        if self.replicas > 0:
            self.replicas -= 1
            self._scaled.append((time.monotonic(), -1))
            self._remove(forced=True)

    # -- the autoscaler --

    def value(self) -> float | None:
        try:
            samples = scrape(self.metrics_url, "loratune-optimizer")
        except OSError:
            return None
        return evaluate(self.scaling.query, samples)

    def desired(self, value: float | None, now: float) -> int:
        s = self.scaling
        current = self.replicas
        if value is None:  # an error: keep what there is; fall back after enough of them
            self._failures += 1
            if current > 0 and self._failures >= s.fallback_failures:
                return max(s.fallback_replicas, 1)
            return current
        self._failures = 0
        active = value > s.activation
        if active:
            self._last_active = now
        if current == 0:
            return min(max(math.ceil(value / s.threshold), 1), s.max_replicas) if active else 0
        if not active and (self._last_active is None or now - self._last_active >= s.cooldown):
            return s.min_replicas
        wanted = min(max(math.ceil(value / s.threshold), 1), s.max_replicas)
        # The HPA: the highest recommendation of the scale-down window, the lowest of the
        # scale-up window, then the policies' pods per period.
        self._recommendations.append((now, wanted))
        horizon = max(s.down_window, s.up_window)
        self._recommendations = [(t, r) for t, r in self._recommendations if now - t <= horizon]
        if wanted < current:
            wanted = max(r for t, r in self._recommendations if now - t <= s.down_window)
            moved = sum(-c for t, c in self._scaled if c < 0 and now - t < s.down_period)
            wanted = max(wanted, current - max(s.down_pods - moved, 0))
        elif wanted > current:
            wanted = min(r for t, r in self._recommendations if now - t <= s.up_window)
            moved = sum(c for t, c in self._scaled if c > 0 and now - t < s.up_period)
            wanted = min(max(wanted, current), current + max(s.up_pods - moved, 0))
        return wanted

    def step(self) -> None:
        """One polling interval: probe the pods, read the metric, scale."""
        now = time.monotonic()
        self._probe()
        value = self.value()
        wanted = self.desired(value, now)
        self.history.append((now, wanted, value))
        if wanted != self.replicas:
            self._scaled.append((now, wanted - self.replicas))
        while self.replicas < wanted:
            self.replicas += 1
            self._spawn()
        while self.replicas > wanted:
            self.replicas -= 1
            self._remove(forced=False)

    async def run(self, stop: asyncio.Event) -> None:
        """Polls until `stop` is set (pods keep being probed at 5x the polling rate)."""
        ticks = 0
        while not stop.is_set():
            if ticks % 5 == 0:
                await asyncio.to_thread(self.step)
            else:
                await asyncio.to_thread(self._probe)
            ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.scaling.polling / 5)

    def close(self) -> None:
        with self.lock:
            pods = list(self.pods)
        for pod in pods:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
        for pod in pods:
            try:
                pod.process.wait(30)
            except subprocess.TimeoutExpired:
                pod.process.kill()
        self.api.close()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the harness's process dies (a test killed on timeout
    leaves no trainer behind). Linux only; elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _busy(address: str) -> bool | None:
    """Whether the trainer runs a job now (None: it does not answer)."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = trainer_pb2_grpc.TrainerServiceStub(channel).GetTrainerStatus(
                trainer_pb2.GetTrainerStatusRequest(), timeout=2
            )
            return bool(reply.busy)
    except grpc.RpcError:
        return None


def trainer_environment(root: Path) -> dict[str, str]:
    """What each trainer process runs with."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        LORATUNE_ARTIFACT_ROOT=str(root),
        LORATUNE_GRACE_PERIOD_SECONDS="10",
        OMP_NUM_THREADS="1",
    )
