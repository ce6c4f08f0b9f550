"""Trainer discovery through the Kubernetes API: ready pods matching a label selector."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


class KubernetesTrainers:
    """Addresses (`podIP:port`) of the ready trainer pods in a namespace."""

    def __init__(
        self, namespace: str, label_selector: str, port: int, api: Any | None = None
    ) -> None:
        self._namespace = namespace
        self._selector = label_selector
        self._port = port
        self._api = api

    def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._api = client.CoreV1Api()
        return self._api

    def _list(self) -> list[str]:
        pods = self._core_api().list_namespaced_pod(
            self._namespace, label_selector=self._selector, _request_timeout=10
        )
        addresses = []
        for pod in pods.items:
            status = pod.status
            if status is None or status.phase != "Running" or not status.pod_ip:
                continue
            if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
                continue
            ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or []))
            if ready:
                addresses.append(f"{status.pod_ip}:{self._port}")
        return sorted(addresses)

    async def addresses(self) -> list[str]:
        """Ready trainer pods now; [] (logged) when the API cannot be reached."""
        try:
            return await asyncio.to_thread(self._list)
        except Exception as err:  # the API server being away must not stop studies
            logger.warning("Kubernetes discovery failed: %s", type(err).__name__)
            return []
