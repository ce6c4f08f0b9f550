"""The rules every rendered object keeps: probes, resources, security context, pinned
images, GPU placement, placeholder-only Secrets, grace periods, disruption budgets and
NetworkPolicies (evaluated as a CNI would: who may open which port of whom)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.unit.deploy.conftest import (
    IMAGE,
    K8S,
    OVERLAYS,
    container,
    find,
    pod_labels,
    pod_spec,
    secret_values,
    workloads,
)

Doc = dict[str, Any]
Docs = list[Doc]
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
PLACEHOLDERS = {"", "CHANGE-ME"}
# Non-root users: the loratune image's (deploy/Dockerfile), and the postgres image's.
USERS = {IMAGE: 10001, "postgres": 999}
# An address outside the cluster, one inside it (pod network), and the cluster DNS.
INTERNET = "203.0.113.10"
CLUSTER_ADDRESS = "10.1.2.3"
DNS = "10.96.0.10"


def _all_docs(rendered: dict[str, Docs], submit_job: Doc) -> Iterator[tuple[str, Docs]]:
    for overlay in OVERLAYS:
        yield overlay, [*rendered[overlay], submit_job]


def _image_name(image: str) -> str:
    return image.rsplit(":", 1)[0]


def _grace_and_drain(docs: Docs) -> float:
    config = find(docs, "ConfigMap", "loratune-config")["data"]
    return float(config["LORATUNE_GRACE_PERIOD_SECONDS"]) + float(
        config["LORATUNE_SHUTDOWN_DRAIN_SECONDS"]
    )


# ---- containers --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_probed_bounded_and_locked_down(
    rendered: dict[str, Docs], submit_job: Doc, overlay: str
) -> None:
    for workload in workloads([*rendered[overlay], submit_job]):
        name = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_context = spec.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, name
        for main in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = main["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[bound]), (name, bound)
            context = main["securityContext"]
            assert context["runAsNonRoot"] is True, name
            user = USERS.get(_image_name(main["image"]), 10001)
            assert context["runAsUser"] == user != 0, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
            # A read-only root: every place the services write is a volume.
            mounts = {m["mountPath"] for m in main.get("volumeMounts", [])}
            assert "/tmp" in mounts, name
            env = {e["name"]: e.get("value", "") for e in main.get("env", [])}
            for variable in ("HF_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
                if variable in env:
                    assert any(env[variable].startswith(m + "/") for m in mounts), (name, variable)
            if workload["kind"] == "Job":
                continue
            assert main["readinessProbe"] and main["livenessProbe"], name
            ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
            if "grpc" in ports:  # the gRPC services: the standard health service, natively
                for probe in ("readinessProbe", "livenessProbe"):
                    assert main[probe]["grpc"]["port"] == ports["grpc"], (name, probe)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_to_one_tag(
    rendered: dict[str, Docs], submit_job: Doc, overlay: str
) -> None:
    docs = rendered[overlay]
    images = [c["image"] for w in workloads(docs) for c in pod_spec(w)["containers"]]
    for image in images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
    tags = {i.rsplit(":", 1)[1] for i in images if _image_name(i) == IMAGE}
    assert len(tags) == 1, tags
    # One edit changes them all: the tag comes from kustomize `images:`, set once in base.
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8"))
    (entry,) = [i for i in base["images"] if i["name"] == IMAGE]
    if overlay == "gpu":
        assert tags == {entry["newTag"]}
        # The Job, applied on its own, names the same tag.
        assert container(submit_job)["image"] == f"{IMAGE}:{entry['newTag']}"
    for path in (K8S / "base").glob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert f"{IMAGE}:" not in path.read_text(encoding="utf-8"), path


def test_gpu_trainers_ask_for_a_gpu_on_gpu_nodes(rendered: dict[str, Docs]) -> None:
    trainer = find(rendered["gpu"], "Deployment", "loratune-trainer")
    resources = container(trainer)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    spec = pod_spec(trainer)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert trainer["spec"]["replicas"] >= 2
    # Only trainers hold GPUs.
    for workload in workloads(rendered["gpu"]):
        if workload is not trainer:
            assert "nvidia.com/gpu" not in str(pod_spec(workload)), workload["metadata"]["name"]


def test_cpu_dev_has_one_small_trainer_and_no_gpu(rendered: dict[str, Docs]) -> None:
    docs = rendered["cpu-dev"]
    assert "nvidia.com/gpu" not in str(docs)
    trainer = find(docs, "Deployment", "loratune-trainer")
    assert trainer["spec"]["replicas"] == 1
    spec = pod_spec(trainer)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    gpu_trainer = container(find(rendered["gpu"], "Deployment", "loratune-trainer"))
    small, large = container(trainer)["resources"], gpu_trainer["resources"]
    assert _bytes(small["limits"]["memory"]) < _bytes(large["limits"]["memory"])
    assert _bytes(small["limits"]["memory"]) <= 8 * 2**30


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# ---- secrets, grace, disruption, services ----------------------------------------------


def test_secrets_carry_placeholders_only(rendered: dict[str, Docs]) -> None:
    for overlay, docs in rendered.items():
        secrets = [d for d in docs if d["kind"] == "Secret"]
        assert secrets
        for secret in secrets:
            for key, value in secret_values(secret).items():
                assert value in PLACEHOLDERS, f"{overlay}: {secret['metadata']['name']}.{key}"


def test_every_reference_resolves(rendered: dict[str, Docs], submit_job: Doc) -> None:
    """Secrets, ConfigMaps and claims that pods name exist, with the keys named."""
    for overlay, docs in _all_docs(rendered, submit_job):
        data = {
            (d["kind"], d["metadata"]["name"]): set(secret_values(d))
            if d["kind"] == "Secret"
            else set(d.get("data", {}))
            for d in docs
            if d["kind"] in {"Secret", "ConfigMap"}
        }
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for workload in workloads(docs):
            spec = pod_spec(workload)
            for volume in spec.get("volumes", []):
                if "secret" in volume:
                    assert ("Secret", volume["secret"]["secretName"]) in data
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in data
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            for main in spec["containers"]:
                for source in main.get("envFrom", []):
                    for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                        if field in source:
                            assert (kind, source[field]["name"]) in data, (overlay, source)
                for variable in main.get("env", []):
                    for kind, field in (
                        ("Secret", "secretKeyRef"),
                        ("ConfigMap", "configMapKeyRef"),
                    ):
                        ref = variable.get("valueFrom", {}).get(field)
                        if ref:
                            assert ref["key"] in data[(kind, ref["name"])], (overlay, ref)


def test_grace_periods_outlast_the_services_own(rendered: dict[str, Docs]) -> None:
    for overlay, docs in rendered.items():
        own = _grace_and_drain(docs)
        periods = {}
        for workload in workloads(docs):
            period = pod_spec(workload)["terminationGracePeriodSeconds"]
            if _image_name(container(workload)["image"]) == IMAGE:
                assert period > own, (overlay, workload["metadata"]["name"])
            periods[pod_labels(workload)[COMPONENT]] = period
        # A trainer ends its job between steps first: it gets the longest.
        assert periods["trainer"] == max(periods.values()) >= 2 * own


def test_disruption_budgets_protect_trainers_and_never_block_a_drain(
    rendered: dict[str, Docs],
) -> None:
    for overlay, docs in rendered.items():
        budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
        replicas = {
            pod_labels(w)[COMPONENT]: w["spec"].get("replicas", 1)
            for w in workloads(docs)
            if w["kind"] != "Job"
        }
        covered = {}
        for budget in budgets:
            (component,) = [
                c
                for c in replicas
                if _selects(budget["spec"]["selector"], {PART_OF: "loratune", COMPONENT: c})
            ]
            covered[component] = budget["spec"]
            # A budget that can never be met stalls `kubectl drain` forever.
            assert budget["spec"].get("maxUnavailable", 1) != 0, (overlay, component)
            assert budget["spec"].get("minAvailable", 0) < replicas[component], (overlay, component)
        assert covered["trainer"] == {
            "maxUnavailable": 1,
            "selector": covered["trainer"]["selector"],
        }


def test_services_are_labelled_and_name_their_metrics_ports(rendered: dict[str, Docs]) -> None:
    for overlay, docs in rendered.items():
        pods = {pod_labels(w)[COMPONENT]: w for w in workloads(docs)}
        for service in (d for d in docs if d["kind"] == "Service"):
            labels = service["metadata"]["labels"]
            assert labels[PART_OF] == "loratune", service["metadata"]["name"]
            workload = pods[labels[COMPONENT]]
            assert service["spec"]["selector"].items() <= pod_labels(workload).items()
            container_ports = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in container_ports, (overlay, port)
            named = {p["name"]: p for p in service["spec"]["ports"]}
            if "metrics" in container_ports:
                assert named["metrics"]["targetPort"] == "metrics"
        # Scrape annotations on every loratune pod, at its metrics port.
        for workload in workloads(docs):
            main = container(workload)
            if _image_name(main["image"]) != IMAGE:
                continue
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            ports = {p["name"]: p["containerPort"] for p in main["ports"]}
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == ports["metrics"]


# ---- network policy ------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


class Peer:
    """A pod of the loratune namespace, a pod of another namespace, or an address."""

    def __init__(
        self,
        labels: dict[str, str] | None = None,
        namespace: dict[str, str] | None = None,
        ip: str = "",
        ports: dict[str, int] | None = None,
    ) -> None:
        self.labels = labels
        self.namespace = (
            namespace if namespace is not None else {"kubernetes.io/metadata.name": "loratune"}
        )
        self.ip = ip
        self.ports = ports or {}

    @property
    def local(self) -> bool:
        """A pod of the policies' namespace."""
        return (
            self.labels is not None
            and self.namespace.get("kubernetes.io/metadata.name") == "loratune"
        )


def _peer_matches(rule_peers: list[dict[str, Any]] | None, peer: Peer) -> bool:
    if not rule_peers:  # absent or empty: every source / destination
        return True
    for entry in rule_peers:
        if "ipBlock" in entry:
            if not peer.ip:
                continue  # pod-to-pod traffic is judged by selectors (cluster CIDRs aside)
            address = ipaddress.ip_address(peer.ip)
            block = entry["ipBlock"]
            if address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
            continue
        if peer.labels is None:
            continue
        if "namespaceSelector" in entry:
            if not _selects(entry["namespaceSelector"], peer.namespace):
                continue
        elif not peer.local:
            continue
        if _selects(entry.get("podSelector", {}), peer.labels):
            return True
    return False


def _port_matches(
    rule_ports: list[dict[str, Any]] | None, port: int, protocol: str, target: Peer
) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = target.ports.get(wanted)
        if wanted is not None and wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def _allowed(policies: Docs, source: Peer, target: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `source` may open `port` of `target` under the namespace's policies."""
    if source.local:
        assert source.labels is not None
        egress = [
            p
            for p in policies
            if "Egress" in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], source.labels)
        ]
        if egress and not any(
            _peer_matches(rule.get("to"), target)
            and _port_matches(rule.get("ports"), port, protocol, target)
            for policy in egress
            for rule in policy["spec"].get("egress") or []
        ):
            return False
    if target.local:
        assert target.labels is not None
        ingress = [
            p
            for p in policies
            if "Ingress" in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], target.labels)
        ]
        if ingress and not any(
            _peer_matches(rule.get("from"), source)
            and _port_matches(rule.get("ports"), port, protocol, target)
            for policy in ingress
            for rule in policy["spec"].get("ingress") or []
        ):
            return False
    return True


def _pods(docs: Docs) -> dict[str, Peer]:
    pods = {}
    for workload in workloads(docs):
        ports = {p["name"]: p["containerPort"] for p in container(workload).get("ports", [])}
        pods[pod_labels(workload)[COMPONENT]] = Peer(pod_labels(workload), ports=ports)
    return pods


# Who may call whom inside the namespace: every other pair is refused.
CALLS = {
    ("optimizer", "trainer", 50052),
    ("optimizer", "evaluator", 50053),
    ("optimizer", "judge-gateway", 50054),
    ("optimizer", "postgres", 5432),
    ("evaluator", "judge-gateway", 50054),
    ("console", "optimizer", 50051),
    ("console", "judge-gateway", 50054),
    ("submit-study", "optimizer", 50051),
    ("optuna-dashboard", "postgres", 5432),
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_calls_the_services_make(
    rendered: dict[str, Docs], submit_job: Doc, overlay: str
) -> None:
    docs = [*rendered[overlay], submit_job]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = _pods(docs)
    assert set(pods) == {
        "optimizer",
        "trainer",
        "evaluator",
        "judge-gateway",
        "console",
        "postgres",
        "submit-study",
        "optuna-dashboard",
    }
    # Every component has a policy of its own (not only the namespace-wide ones).
    for component, pod in pods.items():
        assert pod.labels is not None
        own = [
            p
            for p in policies
            if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], pod.labels)
        ]
        assert own, component
    allowed = {
        (source, target, port)
        for source, src in pods.items()
        for target, dst in pods.items()
        for port in dst.ports.values()
        if source != target and _allowed(policies, src, dst, port)
    }
    assert allowed == CALLS

    # Prometheus (monitoring namespace, prometheus pods) scrapes every metrics port, and
    # nothing else; a pod of another namespace scrapes none.
    prometheus = Peer(
        {"app.kubernetes.io/name": "prometheus"},
        namespace={"kubernetes.io/metadata.name": "monitoring"},
    )
    stranger = Peer({"app": "x"}, namespace={"kubernetes.io/metadata.name": "default"})
    for component, pod in pods.items():
        for name, port in pod.ports.items():
            public = component == "console" and name == "http"
            assert _allowed(policies, prometheus, pod, port) == (name == "metrics" or public)
            assert _allowed(policies, stranger, pod, port) == public, (component, name)
    # Users reach the console's page from anywhere (an Ingress controller, a load balancer).
    users = Peer(ip=INTERNET)
    assert _allowed(policies, users, pods["console"], pods["console"].ports["http"])
    assert not _allowed(policies, users, pods["optimizer"], 50051)

    # Leaving the cluster: the judge gateway (HTTPS to the providers) and the optimizer (the
    # Kubernetes API, not a pod); with components/hub-egress, trainers and the evaluator
    # (Hugging Face hub downloads).
    out = {c for c, pod in pods.items() if _allowed(policies, pod, Peer(ip=INTERNET), 443)}
    expected = {"judge-gateway", "optimizer"}
    if overlay == "cpu-dev":
        expected |= {"trainer", "evaluator"}
    assert out == expected
    assert _allowed(policies, pods["optimizer"], Peer(ip=INTERNET), 6443)
    assert not _allowed(policies, pods["judge-gateway"], Peer(ip=CLUSTER_ADDRESS), 443)
    assert not _allowed(policies, pods["optimizer"], Peer(ip=INTERNET), 5432)
    # Everyone resolves names.
    for component, pod in pods.items():
        for protocol in ("UDP", "TCP"):
            assert _allowed(policies, pod, Peer(ip=DNS), 53, protocol), component
