"""deploy/k8s: the manifests agree with the code (commands, ports, variables, discovery)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from services.cli.main import app
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.evaluator.config import EvaluatorSettings
from services.judge_gateway.config import JudgeSettings
from services.optimizer.config import OptimizerSettings
from services.trainer.config import TrainerSettings

K8S = Path(__file__).resolve().parents[3] / "deploy" / "k8s"
SERVICES = ("optimizer", "trainer", "evaluator", "judge-gateway")
# The providers' own variables, read by their SDKs / the judge registry.
PROVIDER_VARIABLES = {"GEMINI_API_KEY", "GIGACHAT_CREDENTIALS"}
# Read by the CLI and the console (typer options with envvar=...).
CLI_VARIABLES = {"LORATUNE_OPTIMIZER_ADDRESS"}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    docs: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name
        docs += _documents(K8S / name)
    return docs


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _known_variables() -> set[str]:
    names = PROVIDER_VARIABLES | CLI_VARIABLES
    for settings in (CommonSettings, OptimizerSettings, TrainerSettings, EvaluatorSettings):
        names |= {f"LORATUNE_{field.upper()}" for field in settings.model_fields}
    names |= {f"LORATUNE_JUDGE_{field.upper()}" for field in JudgeSettings.model_fields}
    names |= {field.upper() for field in TrainingDefaults.model_fields}
    return names


@pytest.mark.parametrize("service", SERVICES)
def test_each_deployment_serves_its_ports_and_probes_them(
    manifests: list[dict[str, Any]], service: str
) -> None:
    deployment = _find(manifests, "Deployment", f"loratune-{service}")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deployment)
    args = container["args"]
    assert args[:2] == ["serve", service]
    grpc_port = int(args[args.index("--port") + 1])
    metrics_port = int(args[args.index("--metrics-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    assert container["readinessProbe"]["grpc"]["port"] == grpc_port
    assert container["livenessProbe"]["grpc"]["port"] == grpc_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    # The command line the pod runs exists (typer answers --help for it).
    result = CliRunner().invoke(app, [*args[:2], "--help"])
    assert result.exit_code == 0, result.output
    assert "--metrics-port" in result.output
    if service != "trainer":  # trainers are reached pod by pod, through discovery
        svc = _find(manifests, "Service", f"loratune-{service}")
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)


def test_every_variable_set_is_one_the_code_reads(manifests: list[dict[str, Any]]) -> None:
    known = _known_variables()
    config = _find(manifests, "ConfigMap", "loratune-config")["data"]
    secrets = _find(manifests, "Secret", "loratune-secrets")["stringData"]
    used = set(config) | set(secrets)
    for deployment in (d for d in manifests if d["kind"] == "Deployment"):
        used |= {e["name"] for e in _container(deployment).get("env", []) if "value" in e}
    used.discard("HF_HOME")  # Hugging Face's own cache location
    assert used - known == set()
    # Secrets stay out of the ConfigMap.
    assert not {"LORATUNE_AUTH_TOKEN", "LORATUNE_STORAGE_URL", *PROVIDER_VARIABLES} & set(config)


def test_addresses_and_discovery_point_at_the_services(manifests: list[dict[str, Any]]) -> None:
    config = _find(manifests, "ConfigMap", "loratune-config")["data"]
    for variable, service in (
        ("LORATUNE_EVALUATOR_ADDRESS", "evaluator"),
        ("LORATUNE_JUDGE_ADDRESS", "judge-gateway"),
    ):
        host, port = config[variable].rsplit(":", 1)
        svc = _find(manifests, "Service", host)
        assert svc["metadata"]["name"] == f"loratune-{service}"
        assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    # The optimizer discovers trainers by exactly the labels the trainer pods carry.
    assert config["LORATUNE_TRAINERS"] == ""
    settings = OptimizerSettings(
        k8s_label_selector=config["LORATUNE_K8S_LABEL_SELECTOR"],
        k8s_trainer_port=int(config["LORATUNE_K8S_TRAINER_PORT"]),
    )
    trainer = _find(manifests, "Deployment", "loratune-trainer")
    labels = trainer["spec"]["template"]["metadata"]["labels"]
    for clause in settings.k8s_label_selector.split(","):
        key, value = clause.split("=")
        assert labels[key] == value
    trainer_ports = {p["name"]: p["containerPort"] for p in _container(trainer)["ports"]}
    assert trainer_ports["grpc"] == settings.k8s_trainer_port
    namespace = _find(manifests, "Namespace", "loratune")["metadata"]["name"]
    assert config["LORATUNE_K8S_NAMESPACE"] == namespace
    # Each trainer gets a GPU.
    resources = _container(trainer)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"


def test_the_optimizer_may_list_and_watch_pods(manifests: list[dict[str, Any]]) -> None:
    optimizer = _find(manifests, "Deployment", "loratune-optimizer")
    account = optimizer["spec"]["template"]["spec"]["serviceAccountName"]
    _find(manifests, "ServiceAccount", account)
    binding = _find(manifests, "RoleBinding", account)
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    role = _find(manifests, "Role", binding["roleRef"]["name"])
    pod_rules = [r for r in role["rules"] if "pods" in r["resources"]]
    assert pod_rules and {"list", "watch"} <= set(pod_rules[0]["verbs"])
    assert optimizer["spec"]["replicas"] == 1
    assert optimizer["spec"]["strategy"]["type"] == "Recreate"


def test_optimizer_and_trainers_share_the_artifact_volume(
    manifests: list[dict[str, Any]],
) -> None:
    root = _find(manifests, "ConfigMap", "loratune-config")["data"]["LORATUNE_ARTIFACT_ROOT"]
    _find(manifests, "PersistentVolumeClaim", "loratune-artifacts")
    for name in ("loratune-optimizer", "loratune-trainer"):
        deployment = _find(manifests, "Deployment", name)
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in _container(deployment)["volumeMounts"]}
        assert any(
            volumes.get(volume) == "loratune-artifacts" and path == root
            for volume, path in mounts.items()
        ), name


def test_the_study_job_uses_real_tune_options() -> None:
    (job,) = _documents(K8S / "study-job.yaml")
    assert job["kind"] == "Job"
    args = _container({"spec": {"template": job["spec"]["template"]}})["args"]
    assert args[0] == "tune"
    help_text = CliRunner().invoke(app, ["tune", "--help"], terminal_width=200).output
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag
    assert args[args.index("--optimizer") + 1] == "loratune-optimizer:50051"


def test_the_console_asks_the_optimizer_service(manifests: list[dict[str, Any]]) -> None:
    deployment = _find(manifests, "Deployment", "loratune-console")
    container = _container(deployment)
    args = container["args"]
    assert args[0] == "console"
    port = int(args[args.index("--port") + 1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    host, grpc_port = env["LORATUNE_OPTIMIZER_ADDRESS"].rsplit(":", 1)
    optimizer = _find(manifests, "Service", host)
    assert int(grpc_port) in {p["port"] for p in optimizer["spec"]["ports"]}
    help_text = CliRunner().invoke(app, ["console", "--help"]).output
    assert "--port" in help_text and "--optimizer" in help_text
    svc = _find(manifests, "Service", "loratune-console")
    assert (
        svc["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
