"""A real Prometheus scrapes `loratune up` during a real tiny study and answers the dashboard.

`loratune up` runs the four services in one process, each with its metrics port; Debian's
Prometheus (started here on a free port, storage in a temporary folder) scrapes them every
second under the jobs the ServiceMonitors produce in a cluster (the Services' names), with
the alert rules loaded. While `loratune tune` runs a 5-trial study of a tiny Qwen3, the test
also scrapes each /metrics itself. Then:

- every metric name the dashboard and the alerts read is exported (scraped directly, and
  known to Prometheus), per the exposition's sample names (`x_total`, `h_bucket`, ...);
- every dashboard query, its Grafana variables substituted, is answered by Prometheus's
  HTTP API over the study's time range, with a non-empty result;
- Prometheus loaded every alert rule and evaluates it without error.

Skips, saying so, only where Debian's prometheus package is missing.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_up_and_tune import OPTIMIZER, free_ports, start_up, wait_serving
from tests.unit.monitoring.conftest import (
    ALERTS,
    RULES,
    dashboard,
    dashboard_targets,
    referenced_metric_names,
    substitute,
)

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="Debian's prometheus is missing (`make prometheus` installs it as root)",
    ),
]

# Scrape jobs as a ServiceMonitor names them (the Service's name) -> offset from the metrics
# port base of `loratune up`. Its console has no metrics port of its own: the process has
# one registry, which every metrics port serves, so the console's job scrapes the optimizer's.
JOBS = {
    "loratune-optimizer": 0,
    "loratune-trainer": 1,
    "loratune-evaluator": 2,
    "loratune-judge-gateway": 3,
    "loratune-console": 0,
}
# Queries that may rightly be empty after a healthy classification study.
MAY_BE_EMPTY = ("loratune_optimizer_trial_failures_total",)
STUDY = "prom"


def consecutive_free_ports(n: int) -> int:
    """A base port with the n ports from it free (a bind check; good enough on loopback)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def prometheus_config(base: int, path: Path) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [f"127.0.0.1:{base + offset}"]}],
            }
            for job, offset in JOBS.items()
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"prometheus exited:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"prometheus never ready:\n{log.read_text()}"
        time.sleep(0.2)


def api(url: str, path: str, **params: Any) -> Any:
    reply = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=30)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (path, params, body)
    return body["data"]


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_scrapes_a_study_and_answers_the_dashboard(
    tmp_path: Path, tiny_qwen: Path, sentiment: Path
) -> None:
    assert PROMETHEUS is not None
    base = consecutive_free_ports(4)
    (prom,) = free_ports(1)
    tune_log, prom_log = tmp_path / "tune.log", tmp_path / "prom.log"
    started = start_up(tmp_path, metrics_port_base=base)
    up, env, up_log, web = started.process, started.env, started.log, started.web
    url = f"http://127.0.0.1:{prom}"
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={prometheus_config(base, tmp_path / 'prometheus.yml')}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom}",
            "--log.level=warn",
        ],
        stdout=prom_log.open("w"),
        stderr=subprocess.STDOUT,
    )
    tune: subprocess.Popen[Any] | None = None
    try:
        wait_ready(url, prometheus, prom_log, 30)
        address = started.address
        wait_serving(address, OPTIMIZER, up, 60)
        started = time.time()
        # The console's metrics (labelled by route) exist once it has answered a request.
        assert httpx.get(f"http://127.0.0.1:{web}/projects", timeout=10).status_code == 200
        tune = subprocess.Popen(
            [
                *(sys.executable, "-m", "services.cli.main", "tune"),
                *("--optimizer", address, "--dataset", str(sentiment)),
                *("--task", "classification", "--base-model", str(tiny_qwen)),
                *("--n-trials", "5", "--study-name", STUDY, "--epochs", "1", "--ranks", "4"),
                *("--learning-rate", "1e-3,1e-2", "--max-seq-length", "16"),
                *("--batch-size", "8", "--validation-fraction", "0.25"),
            ],
            env=env,
            stdout=tune_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        scraped: set[str] = set()
        best_while_running: list[Any] = []
        deadline = time.monotonic() + 150
        while tune.poll() is None:
            assert time.monotonic() < deadline, f"the study took too long:\n{tune_log.read_text()}"
            for offset in range(4):
                text = httpx.get(f"http://127.0.0.1:{base + offset}/metrics", timeout=5).text
                scraped |= sample_names(text)
            best = api(url, "query", query='loratune_optimizer_study_best_objective{study="prom"}')
            best_while_running += best["result"]
            time.sleep(0.5)
        assert tune.returncode == 0, tune_log.read_text()
        assert f"study {STUDY}: COMPLETED" in tune_log.read_text()
        time.sleep(2.5)  # the last scrapes

        # Every metric the dashboard and the alerts read is exported, and Prometheus has it.
        referenced = referenced_metric_names()
        missing = sorted(referenced - {"up"} - scraped)
        assert not missing, f"read by the dashboard or alerts, exported by no service: {missing}"
        known = set(api(url, "label/__name__/values"))
        assert not sorted(referenced - known), sorted(referenced - known)
        assert best_while_running, "no best objective of the running study was scraped"
        assert all(r["metric"]["job"] in JOBS for r in best_while_running)
        assert 0 <= float(best_while_running[-1]["value"][1]) <= 1

        # Every dashboard query over the study's time range, as Grafana asks it.
        end = time.time()
        empty = []
        for title, expr in dashboard_targets():
            query = substitute(expr)
            data = api(url, "query_range", query=query, start=started, end=end, step="1s")
            assert data["resultType"] == "matrix"
            if not data["result"] and not any(name in expr for name in MAY_BE_EMPTY):
                empty.append(f"{title}: {query}")
        assert not empty, "dashboard queries without a result:\n" + "\n".join(empty)

        # The numbers behind the main panels are the study's.
        def total(query: str) -> float:
            result = api(url, "query", query=query)["result"]
            return sum(float(r["value"][1]) for r in result)

        ended = (
            'loratune_optimizer_trials_total{job="loratune-optimizer", state=~"complete|pruned"}'
        )
        assert total(ended) == 5
        assert total('loratune_optimizer_trial_objective_count{job="loratune-optimizer"}') >= 1
        assert total('loratune_trainer_samples_total{job="loratune-trainer"}') > 0
        timed = 'loratune_evaluator_evaluation_seconds_count{job="loratune-evaluator"}'
        assert total(timed) >= 5
        dispatched = (
            'grpc_server_handled_total{job="loratune-trainer", grpc_method="StartTraining"}'
        )
        assert total(dispatched) >= 5

        # The dashboard's study variable finds the study.
        variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "study")
        selector = variable["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
        series = api(url, "series", **{"match[]": selector, "start": started, "end": end})
        assert STUDY in {s.get("study") for s in series}

        # Prometheus loaded every alert and evaluates it without error.
        groups = api(url, "rules")["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(ALERTS) <= set(rules)
        for name in ALERTS:
            assert rules[name]["health"] == "ok", (name, rules[name].get("lastError"))
        up_values = api(url, "query", query="up")["result"]
        assert {r["metric"]["job"] for r in up_values} == set(JOBS)
        assert all(r["value"][1] == "1" for r in up_values), up_values
    except BaseException:
        for log in (up_log, tune_log, prom_log):
            if log.exists():
                print(f"==== {log.name}\n{log.read_text()[-5000:]}")
        raise
    finally:
        if tune is not None and tune.poll() is None:
            tune.kill()
            tune.wait()
        stop(prometheus)
        stop(up, signal.SIGINT)
    assert json.loads(json.dumps(up.returncode)) == 0, up_log.read_text()[-3000:]
