"""deploy/k8s: the manifests agree with the code (commands, ports, variables, discovery).

Checked on the rendered gpu overlay, the shape a cluster runs.
"""

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
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.config import OptimizerSettings
from services.optimizer.core.project_file import read_projects
from services.trainer.config import TrainerSettings
from tests.unit.deploy.conftest import container, find, pod_spec, secret_values

SERVICES = ("optimizer", "trainer", "evaluator", "judge-gateway")
# The providers' own variables, read by their SDKs / the judge registry.
PROVIDER_VARIABLES = {"GEMINI_API_KEY", "GIGACHAT_CREDENTIALS", "GIGACHAT_CA_BUNDLE_FILE"}
# Read by the CLI and the console (typer options with envvar=...).
CLI_VARIABLES = {"LORATUNE_OPTIMIZER_ADDRESS"}
# Other programs' variables: the Hugging Face, Triton and CUDA caches.
THIRD_PARTY_VARIABLES = {"HF_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"}
# Set only to build another variable's value ($(POSTGRES_PASSWORD) in the storage URL).
HELPER_VARIABLES = {"POSTGRES_PASSWORD"}

Docs = list[dict[str, Any]]


def _known_variables() -> set[str]:
    names = PROVIDER_VARIABLES | CLI_VARIABLES
    for settings in (CommonSettings, OptimizerSettings, TrainerSettings, EvaluatorSettings):
        names |= {f"LORATUNE_{field.upper()}" for field in settings.model_fields}
    names |= {f"LORATUNE_JUDGE_{field.upper()}" for field in JudgeSettings.model_fields}
    names |= {field.upper() for field in TrainingDefaults.model_fields}
    return names


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("service", SERVICES)
def test_each_deployment_serves_its_ports_and_probes_them(gpu: Docs, service: str) -> None:
    deployment = find(gpu, "Deployment", f"loratune-{service}")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    main = container(deployment)
    args = main["args"]
    assert args[:2] == ["serve", service]
    grpc_port = int(args[args.index("--port") + 1])
    metrics_port = int(args[args.index("--metrics-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}
    assert main["readinessProbe"]["grpc"]["port"] == grpc_port
    assert main["livenessProbe"]["grpc"]["port"] == grpc_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    # The command line the pod runs exists (typer answers --help for it).
    assert "--metrics-port" in _help(*args[:2])
    svc = find(gpu, "Service", f"loratune-{service}")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    if service == "trainer":  # reached pod by pod, through discovery
        assert svc["spec"]["clusterIP"] == "None"


def test_every_variable_set_is_one_the_code_reads(gpu: Docs) -> None:
    known = _known_variables()
    config = find(gpu, "ConfigMap", "loratune-config")["data"]
    used = set(config)
    for secret in (d for d in gpu if d["kind"] == "Secret"):
        if secret["metadata"]["name"] in {"loratune-secrets", "loratune-judge-keys"}:
            used |= set(secret_values(secret))
    for deployment in (d for d in gpu if d["kind"] == "Deployment"):
        if container(deployment)["image"].startswith("ghcr.io/loratune/"):
            used |= {e["name"] for e in container(deployment).get("env", [])}
    assert used - known - THIRD_PARTY_VARIABLES - HELPER_VARIABLES == set()
    # Secrets stay out of the ConfigMap.
    assert not {"LORATUNE_AUTH_TOKEN", "LORATUNE_STORAGE_URL", *PROVIDER_VARIABLES} & set(config)


def test_the_optimizer_builds_its_storage_url_from_the_postgres_secret(gpu: Docs) -> None:
    optimizer = container(find(gpu, "Deployment", "loratune-optimizer"))
    env = {e["name"]: e for e in optimizer["env"]}
    names = list(env)
    # $(VAR) expands only variables defined before it.
    assert names.index("POSTGRES_PASSWORD") < names.index("LORATUNE_STORAGE_URL")
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    postgres_secret = find(gpu, "Secret", ref["name"])
    assert ref["key"] in secret_values(postgres_secret)
    url = env["LORATUNE_STORAGE_URL"]["value"]
    assert url.startswith("postgresql+psycopg://")  # psycopg 3, the optimizer extra's driver
    assert "$(POSTGRES_PASSWORD)@loratune-postgres:5432/" in url
    statefulset = find(gpu, "StatefulSet", "loratune-postgres")
    postgres_env = {e["name"]: e for e in container(statefulset)["env"]}
    assert postgres_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    user, database = url.split("//")[1].split(":")[0], url.rsplit("/", 1)[1]
    assert postgres_env["POSTGRES_USER"]["value"] == user
    assert postgres_env["POSTGRES_DB"]["value"] == database
    service = find(gpu, "Service", "loratune-postgres")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "loratune-postgres"


def test_addresses_and_discovery_point_at_the_services(gpu: Docs) -> None:
    config = find(gpu, "ConfigMap", "loratune-config")["data"]
    for variable, service in (
        ("LORATUNE_EVALUATOR_ADDRESS", "evaluator"),
        ("LORATUNE_JUDGE_ADDRESS", "judge-gateway"),
    ):
        host, port = config[variable].rsplit(":", 1)
        svc = find(gpu, "Service", host)
        assert svc["metadata"]["name"] == f"loratune-{service}"
        assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    # The optimizer discovers trainers by exactly the labels the trainer pods carry.
    assert config["LORATUNE_TRAINERS"] == ""
    settings = OptimizerSettings(
        k8s_label_selector=config["LORATUNE_K8S_LABEL_SELECTOR"],
        k8s_trainer_port=int(config["LORATUNE_K8S_TRAINER_PORT"]),
    )
    trainer = find(gpu, "Deployment", "loratune-trainer")
    labels = trainer["spec"]["template"]["metadata"]["labels"]
    for clause in settings.k8s_label_selector.split(","):
        key, value = clause.split("=")
        assert labels[key] == value
    trainer_ports = {p["name"]: p["containerPort"] for p in container(trainer)["ports"]}
    assert trainer_ports["grpc"] == settings.k8s_trainer_port
    namespace = find(gpu, "Namespace", "loratune")["metadata"]["name"]
    assert config["LORATUNE_K8S_NAMESPACE"] == namespace
    assert {d["metadata"].get("namespace", namespace) for d in gpu} == {namespace}


def test_the_optimizer_may_only_read_pods_and_patch_their_deletion_cost(gpu: Docs) -> None:
    optimizer = find(gpu, "Deployment", "loratune-optimizer")
    account = pod_spec(optimizer)["serviceAccountName"]
    find(gpu, "ServiceAccount", account)
    binding = find(gpu, "RoleBinding", account)
    assert {"kind": "ServiceAccount", "name": account, "namespace": "loratune"} in binding[
        "subjects"
    ]
    role = find(gpu, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]}
    ]
    assert not [d for d in gpu if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    assert optimizer["spec"]["replicas"] == 1
    assert optimizer["spec"]["strategy"]["type"] == "Recreate"
    # Only the optimizer talks to the API server: no other pod holds a token.
    for workload in (d for d in gpu if d["kind"] in {"Deployment", "StatefulSet"}):
        if workload is not optimizer:
            assert "serviceAccountName" not in pod_spec(workload)
            assert pod_spec(workload)["automountServiceAccountToken"] is False


def test_optimizer_and_trainers_share_the_artifact_volume(gpu: Docs) -> None:
    root = find(gpu, "ConfigMap", "loratune-config")["data"]["LORATUNE_ARTIFACT_ROOT"]
    claim = find(gpu, "PersistentVolumeClaim", "loratune-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("loratune-optimizer", "loratune-trainer"):
        deployment = find(gpu, "Deployment", name)
        volumes = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(deployment)["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
        assert any(
            volumes.get(volume) == "loratune-artifacts" and path == root
            for volume, path in mounts.items()
        ), name


def test_the_projects_file_is_mounted_where_loratune_projects_points(
    gpu: Docs, tmp_path: Path
) -> None:
    config = find(gpu, "ConfigMap", "loratune-config")["data"]
    path = Path(config["LORATUNE_PROJECTS"])
    optimizer = find(gpu, "Deployment", "loratune-optimizer")
    mounts = {m["name"]: m for m in container(optimizer)["volumeMounts"]}
    (volume,) = [v for v in pod_spec(optimizer)["volumes"] if v.get("configMap", {}).get("name")]
    mount = mounts[volume["name"]]
    # A folder mount (a subPath mount never sees the ConfigMap's updates).
    assert "subPath" not in mount and Path(mount["mountPath"]) == path.parent
    projects = find(gpu, "ConfigMap", volume["configMap"]["name"])
    text = projects["data"][path.name]
    copy = tmp_path / path.name
    copy.write_text(text, encoding="utf-8")
    (project,) = read_projects(copy, search_space_from_json)
    assert (project.project_id, project.name) == (123, "payments")
    # The dataset is on the artifact volume, where trainers read it.
    dataset = yaml.safe_load(text)["projects"][0]["dataset"]
    assert dataset["uri"].startswith(config["LORATUNE_ARTIFACT_ROOT"] + "/")


def test_the_judge_gateway_gets_the_keys_and_the_gigachat_ca_bundle(gpu: Docs) -> None:
    gateway = find(gpu, "Deployment", "loratune-judge-gateway")
    main = container(gateway)
    sources = {s["secretRef"]["name"] for s in main["envFrom"] if "secretRef" in s}
    keys = find(gpu, "Secret", "loratune-judge-keys")
    assert {"GEMINI_API_KEY", "GIGACHAT_CREDENTIALS"} <= set(secret_values(keys))
    assert keys["metadata"]["name"] in sources
    env = {e["name"]: e.get("value") for e in main["env"]}
    bundle = Path(env["GIGACHAT_CA_BUNDLE_FILE"])
    (volume,) = [v for v in pod_spec(gateway)["volumes"] if "secret" in v]
    ca = find(gpu, "Secret", volume["secret"]["secretName"])
    assert bundle.name in secret_values(ca)
    mounts = {m["name"]: Path(m["mountPath"]) for m in main["volumeMounts"]}
    assert mounts[volume["name"]] == bundle.parent
    # No other pod sees the providers' keys.
    for deployment in (d for d in gpu if d["kind"] == "Deployment" and d is not gateway):
        refs = {
            s.get("secretRef", {}).get("name") for s in container(deployment).get("envFrom", [])
        }
        assert keys["metadata"]["name"] not in refs, deployment["metadata"]["name"]


def test_the_study_job_uses_real_tune_options(submit_job: dict[str, Any]) -> None:
    assert submit_job["kind"] == "Job"
    assert submit_job["spec"]["backoffLimit"] == 0
    assert pod_spec(submit_job)["restartPolicy"] == "Never"
    main = container(submit_job)
    args = main["args"]
    assert args[0] == "tune"
    help_text = _help("tune")
    for flag in (a for a in args if a.startswith("--")):
        assert flag in help_text, flag
    assert args[args.index("--optimizer") + 1] == "loratune-optimizer:50051"
    assert int(args[args.index("--project") + 1]) == 123
    assert "--wait" in args  # the exit code says whether the study completed
    env = {e["name"]: e for e in main["env"]}
    assert env["LORATUNE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "loratune-secrets",
        "key": "LORATUNE_AUTH_TOKEN",
    }


def test_the_console_asks_the_optimizer_service(gpu: Docs) -> None:
    deployment = find(gpu, "Deployment", "loratune-console")
    main = container(deployment)
    args = main["args"]
    assert args[:2] == ["serve", "console"]
    port = int(args[args.index("--port") + 1])
    metrics_port = int(args[args.index("--metrics-port") + 1])
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {
        "http": port,
        "metrics": metrics_port,
    }
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert main["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in main["env"]}
    host, grpc_port = env["LORATUNE_OPTIMIZER_ADDRESS"].rsplit(":", 1)
    optimizer = find(gpu, "Service", host)
    assert int(grpc_port) in {p["port"] for p in optimizer["spec"]["ports"]}
    help_text = _help("serve", "console")
    assert "--port" in help_text and "--optimizer" in help_text and "--metrics-port" in help_text
    svc = find(gpu, "Service", "loratune-console")
    assert (
        svc["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
