"""What the monitoring tests share: the files of deploy/k8s/base/monitoring, and how the
dashboard's and the alerts' expressions name metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
MONITORING = ROOT / "deploy" / "k8s" / "base" / "monitoring"
RULES = MONITORING / "rules" / "loratune-alerts.yaml"
RULES_TEST = MONITORING / "rules" / "loratune-alerts.test.yaml"
DASHBOARD = MONITORING / "dashboards" / "loratune.json"
RUNBOOK = ROOT / "deploy" / "README.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# The alerts issue 12 asks for.
ALERTS = (
    "LoratuneServiceDown",
    "LoratuneNoIdleTrainer",
    "LoratuneNoTrainerAppeared",
    "LoratuneStudyStalled",
    "LoratuneTrialFailuresHigh",
    "LoratuneJudgeErrorsHigh",
    "LoratuneJudgeCircuitOpen",
    "LoratuneEvaluatorSlow",
)
# The Services' names, and so the jobs their ServiceMonitors produce.
JOBS = {
    "optimizer": "loratune-optimizer",
    "trainer": "loratune-trainer",
    "evaluator": "loratune-evaluator",
    "judge-gateway": "loratune-judge-gateway",
    "console": "loratune-console",
}
# Grafana's variables, as a test substitutes them to run a panel's query.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${study}": ".*",
    "$study": ".*",
}
# Metric names of the services: loratune_* and the gRPC server's; label names never start so.
_METRIC = re.compile(r"\b(?:loratune|grpc_server)_[A-Za-z0-9_:]*")
_UP = re.compile(r"(?<![A-Za-z0-9_:])up\{")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rule_groups() -> list[dict[str, Any]]:
    return list(load_yaml(RULES)["groups"])


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def substitute(expr: str) -> str:
    """``expr`` with Grafana's variables replaced as a test runs it."""
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The sample names an expression reads (``x_bucket``, ``y_total``, ``up``)."""
    names = set(_METRIC.findall(expr))
    if _UP.search(expr):
        names.add("up")
    return names


def referenced_metric_names() -> set[str]:
    """Every sample name the dashboard (queries and variables) and the alerts read."""
    names: set[str] = set()
    for _, expr in dashboard_targets():
        names |= metric_names(expr)
    for variable in dashboard()["templating"]["list"]:
        if variable.get("type") == "query":
            names |= metric_names(json.dumps(variable["query"]))
    for rule in alert_rules():
        names |= metric_names(rule["expr"])
    return names
