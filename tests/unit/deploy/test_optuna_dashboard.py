"""optuna-dashboard (components/optuna-dashboard) opens loratune's studies.

The study is created by the optimizer's own store (name, direction, the loratune record
in the study's user attributes) and its trials sampled from the real search space with
the attributes the optimizer writes; then optuna-dashboard's WSGI app, called in-process
on the same storage, lists the study and shows its trials through its JSON API.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import yaml

from services.common.defaults import TrainingDefaults
from services.optimizer.core.creation import hyperparameters
from services.optimizer.core.records import META, DatasetRef, FineTuning, StudyRecord, StudySpec
from services.optimizer.core.space import default_space, suggest
from services.optimizer.core.store import StudyStore
from tests.unit.deploy.conftest import K8S

optuna_dashboard = pytest.importorskip(
    "optuna_dashboard", reason="optuna-dashboard (dev extra) is not installed"
)


def _get(app: Any, path: str) -> Any:
    environ: dict[str, Any] = {
        "PATH_INFO": path,
        "REQUEST_METHOD": "GET",
        "wsgi.input": io.BytesIO(),
    }
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, _headers, _exc=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


async def _make_study(storage: optuna.storages.BaseStorage) -> str:
    store = StudyStore(storage)
    spec = StudySpec(123, FineTuning(), DatasetRef(), default_space(True))
    study_id = "study-123-0a1b2c3d"  # the optimizer's naming: study-<project>-<8 hex>
    study = await store.create(study_id, StudyRecord(spec=spec, state="RUNNING"))
    defaults = TrainingDefaults()
    for number, outcome in enumerate(("complete", "pruned", "failed")):
        trial = study.ask()
        params = suggest(trial, spec.space, defaults, classification=True)
        await store.set_trial_attrs(
            study,
            trial._trial_id,
            attempt=1,
            artifact_dir=f"/data/runs/{study_id}/trial-{number}",
            hyperparameters=hyperparameters(spec, params, defaults).to_storage(),
            params_key=json.dumps(trial.params, sort_keys=True),
            job_id=f"{study_id}-t{number}-a1",
            trainer="10.0.0.7:50052",
        )
        if outcome == "failed":
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            continue
        trial.report(0.41 + number / 10, 1)
        if outcome == "pruned":
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
        else:
            trial.report(0.63, 2)
            study.tell(trial.number, 0.63)
    return study_id


def test_optuna_dashboard_lists_our_study_and_its_trials(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study_id = asyncio.run(_make_study(storage))
    app = optuna_dashboard.wsgi(storage)

    studies = _get(app, "/api/studies")["study_summaries"]
    (summary,) = [s for s in studies if s["study_name"] == study_id]
    assert summary["directions"] == ["maximize"]
    details = _get(app, f"/api/studies/{summary['study_id']}")
    assert details["name"] == study_id
    trials = sorted(details["trials"], key=lambda t: t["number"])
    assert [t["state"] for t in trials] == ["Complete", "Pruned", "Fail"]
    assert trials[0]["values"] == [0.63]
    assert [v["step"] for v in trials[0]["intermediate_values"]] == [1, 2]
    params = {p["name"] for p in trials[0]["params"]}
    assert {"rank", "learning_rate"} <= params
    attrs = {a["key"] for a in trials[0]["user_attrs"]}
    assert {"hyperparameters", "job_id", "trainer"} <= attrs
    # The study's loratune record is there too (a user attribute the dashboard shows).
    assert META in {a["key"] for a in details["user_attrs"]}


def test_the_component_runs_the_version_checked_here() -> None:
    """The image tag of the component is the optuna-dashboard this test ran against."""
    component = yaml.safe_load(
        (K8S / "components" / "optuna-dashboard" / "kustomization.yaml").read_text(encoding="utf-8")
    )
    (image,) = component["images"]
    assert image["name"] == "ghcr.io/optuna/optuna-dashboard"
    assert image["newTag"] == f"v{optuna_dashboard.__version__}"
