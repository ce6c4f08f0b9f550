"""Every overlay renders with `kubectl kustomize`, and `kubernetes-validate` (strict: no
unknown field anywhere) accepts every built-in object of it and of jobs/submit-study.yaml
against one pinned Kubernetes version's schemas.

The Prometheus Operator's objects (ServiceMonitor, PrometheusRule of base/monitoring) are
custom resources with no schema here: tests/unit/monitoring checks them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.deploy.conftest import (
    IMAGE,
    OVERLAYS,
    container,
    documents,
    find,
    render,
    secret_values,
)

# The oldest Kubernetes the manifests promise to run on (native gRPC probes need 1.27;
# kubernetes-validate 1.37.0 ships schemas from 1.30 on).
KUBERNETES_VERSION = "1.33.0"
# API groups of custom resources, checked elsewhere.
CUSTOM_GROUPS = ("monitoring.coreos.com/", "keda.sh/")

Docs = list[dict[str, Any]]


def _is_custom(doc: dict[str, Any]) -> bool:
    return str(doc["apiVersion"]).startswith(CUSTOM_GROUPS)


def _validate(docs: Docs, where: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (dev extra) is not installed"
    )
    problems = []
    for doc in docs:
        if _is_custom(doc):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except Exception as err:  # ValidationError, SchemaNotFoundError, ...
            name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            problems.append(f"{where}: {name}: {str(err)[:500]}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_validates(rendered: dict[str, Docs], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "StatefulSet",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
    } <= kinds
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    # optuna-dashboard is in both overlays.
    find(docs, "Deployment", "loratune-optuna-dashboard")
    _validate(docs, overlay)


def test_the_submit_study_job_validates() -> None:
    from tests.unit.deploy.conftest import SUBMIT_JOB

    _validate(documents(SUBMIT_JOB), SUBMIT_JOB.name)


def test_an_external_postgres_replaces_the_statefulset_with_one_secret_value(
    kustomize_dir: Callable[[str], Path],
) -> None:
    directory = kustomize_dir(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [{root}/deploy/k8s/overlays/gpu]\n"
        "components: [{root}/deploy/k8s/components/external-postgres]\n"
    )
    docs = render(directory)
    _validate(docs, "gpu + external-postgres")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    component = {
        d["metadata"]["name"]
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "postgres"
    }
    assert component == set()
    storage = secret_values(find(docs, "Secret", "loratune-storage"))
    assert set(storage) == {"LORATUNE_STORAGE_URL", "OPTUNA_DASHBOARD_STORAGE_URL"}
    optimizer = {
        e["name"]: e for e in container(find(docs, "Deployment", "loratune-optimizer"))["env"]
    }
    assert optimizer["LORATUNE_STORAGE_URL"] == {
        "name": "LORATUNE_STORAGE_URL",
        "valueFrom": {"secretKeyRef": {"name": "loratune-storage", "key": "LORATUNE_STORAGE_URL"}},
    }
    assert "POSTGRES_PASSWORD" not in optimizer
    dashboard = container(find(docs, "Deployment", "loratune-optuna-dashboard"))
    env = {e["name"]: e for e in dashboard["env"]}
    assert env["OPTUNA_STORAGE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "loratune-storage",
        "key": "OPTUNA_DASHBOARD_STORAGE_URL",
    }
    # Nothing still points at the removed Secret.
    assert "loratune-postgres" not in str([d for d in docs if d["kind"] == "Deployment"])


def test_the_dashboard_and_the_image_tags_are_pinned(rendered: dict[str, Docs]) -> None:
    for overlay, docs in rendered.items():
        images = {container(d)["image"] for d in docs if d["kind"] in {"Deployment", "StatefulSet"}}
        for image in images:
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, (overlay, image)
        assert len({i for i in images if i.startswith(IMAGE + ":")}) == 1, (overlay, images)
