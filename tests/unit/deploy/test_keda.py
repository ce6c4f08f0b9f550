"""components/keda: the trainers' ScaledObject, as overlays/gpu-keda renders it, against
KEDA's CRD model and the optimizer's own metrics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.unit.deploy.conftest import find
from tests.unit.monitoring.conftest import metric_names

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def keda(rendered: dict[str, Docs]) -> Docs:
    return rendered["gpu-keda"]


def _scaled_object(docs: Docs) -> dict[str, Any]:
    return find(docs, "ScaledObject", "loratune-trainer")


def test_the_scaled_object_validates_against_kedas_model(keda: Docs) -> None:
    """Strict: it parses into KEDA's CRD model and dumps back unchanged (no unknown field)."""
    models = pytest.importorskip(
        "cloudcoil.models.keda.v1alpha1", reason="cloudcoil-models-keda (dev extra) is missing"
    )
    obj = _scaled_object(keda)
    model = models.ScaledObject.model_validate(obj)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj
    typo = yaml.safe_load(yaml.safe_dump(obj))
    typo["spec"]["minReplicas"] = typo["spec"].pop("minReplicaCount")
    dumped = models.ScaledObject.model_validate(typo).model_dump(
        by_alias=True, exclude_unset=True, mode="json"
    )
    assert dumped != typo  # what the round trip catches


def test_it_scales_the_trainers_from_zero_on_the_optimizers_metrics(keda: Docs) -> None:
    spec = _scaled_object(keda)["spec"]
    trainer = find(keda, "Deployment", spec["scaleTargetRef"]["name"])
    assert trainer["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"
    assert "replicas" not in trainer["spec"]  # the HPA owns it
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    # Warm between the trials of a study: far longer than a dispatch takes.
    assert spec["cooldownPeriod"] >= 300
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert float(metadata["threshold"]) == 1.0
    assert 0 <= float(metadata["activationThreshold"]) < 1.0  # one waiting trial activates
    # No data must not read as zero while trials wait.
    assert metadata["ignoreNullValues"] == "false"
    assert spec["fallback"]["replicas"] >= 1
    # Every series the query reads is one the optimizer exports.
    import services.optimizer.metrics  # noqa: F401 - registers the optimizer's metrics

    exported = {
        name
        for collector in REGISTRY._collector_to_names
        for name in [getattr(collector, "_name", "")]
    }
    read = metric_names(metadata["query"])
    assert read == {"loratune_optimizer_trials_waiting", "loratune_optimizer_trainers"}
    assert read <= exported


def test_the_query_is_valid_promql(keda: Docs, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (Debian's prometheus package: make prometheus)")
    query = _scaled_object(keda)["spec"]["triggers"][0]["metadata"]["query"]
    rules = {"groups": [{"name": "keda", "rules": [{"record": "keda:trainers", "expr": query}]}]}
    path = tmp_path / "keda.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
