"""Trainer discovery through the Kubernetes API: ready pods matching a label selector.

The optimizer also keeps each trainer pod's `controller.kubernetes.io/pod-deletion-cost`
annotation current: high while the trainer runs a job, low while it is idle. When the
trainer Deployment is scaled in (by hand, the HPA or KEDA), the ReplicaSet controller
removes the pods of lowest cost first, so idle trainers go before busy ones (an
autoscaler alone picks at random: kedacore/keda#3674, #2900). It needs the Role's
`patch` on pods (deploy/k8s/base/optimizer.yaml) and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# Idle trainers go first; an annotated busy trainer outranks any pod that has none (0).
BUSY_COST = "1000"
IDLE_COST = "-1000"


class KubernetesTrainers:
    """Addresses (`podIP:port`) of the ready trainer pods in a namespace."""

    def __init__(
        self, namespace: str, label_selector: str, port: int, api: Any | None = None
    ) -> None:
        self._namespace = namespace
        self._selector = label_selector
        self._port = port
        self._api = api
        self._pods: dict[str, str] = {}  # address -> pod name, as last listed
        self._costs: dict[str, str] = {}  # pod name -> its deletion cost, as last seen or set

    def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                # KUBECONFIG as it is now: the client reads the variable once, when it is
                # first imported, and would miss one set later (a test, a wrapper script).
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
            self._api = client.CoreV1Api()
        return self._api

    def _list(self) -> list[str]:
        pods = self._core_api().list_namespaced_pod(
            self._namespace, label_selector=self._selector, _request_timeout=10
        )
        addresses = []
        names: dict[str, str] = {}
        costs: dict[str, str] = {}
        for pod in pods.items:
            status = pod.status
            if status is None or status.phase != "Running" or not status.pod_ip:
                continue
            if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
                continue
            ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
            if ready:
                address = f"{status.pod_ip}:{self._port}"
                addresses.append(address)
                if pod.metadata is not None and pod.metadata.name:
                    names[address] = pod.metadata.name
                    annotations = pod.metadata.annotations or {}
                    if DELETION_COST in annotations:
                        costs[pod.metadata.name] = str(annotations[DELETION_COST])
        self._pods = names
        self._costs = costs
        return sorted(addresses)

    def _patch(self, name: str, cost: str) -> None:
        self._core_api().patch_namespaced_pod(
            name,
            self._namespace,
            {"metadata": {"annotations": {DELETION_COST: cost}}},
            _content_type="application/merge-patch+json",
            _request_timeout=10,
        )

    async def addresses(self) -> list[str]:
        """Ready trainer pods now; [] (logged) when the API cannot be reached."""
        try:
            return await asyncio.to_thread(self._list)
        except Exception as err:  # the API server being away must not stop studies
            logger.warning("Kubernetes discovery failed: %s", type(err).__name__)
            return []

    async def mark(self, address: str, busy: bool) -> None:
        """Sets the trainer pod's deletion cost for `busy` (when it changed); a failure is
        logged and the next look at the pool tries again."""
        name = self._pods.get(address)
        cost = BUSY_COST if busy else IDLE_COST
        if name is None or self._costs.get(name) == cost:
            return
        try:
            await asyncio.to_thread(self._patch, name, cost)
        except Exception as err:  # the API server being away must not stop studies
            logger.warning("could not annotate trainer pod %s: %s", name, type(err).__name__)
            return
        self._costs[name] = cost
