"""The projects file (LORATUNE_PROJECTS): its shape, its checks, and reading it again on change."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.config import OptimizerSettings
from services.optimizer.core.project_file import parse_projects
from services.optimizer.core.projects import ProjectCatalog, apply_project, with_project
from services.optimizer.core.records import (
    DatasetRef,
    FineTuning,
    StudyRequest,
    TrainingOverrides,
)

GOOD = """
projects:
  - id: 124
    name: support
    dataset:
      uri: s3://bucket/support.jsonl
      task_type: TASK_TYPE_GENERATION
      prompt_field: question
      target_field: answer
    use_llm_judge: true
    judge_model_id: gemini
  - id: 123
    name: payments
    dataset:
      uri: data/../data/payments.csv
      task_type: Classification
      format: CSV
      text_field: comment
      label_field: code
      validation_uri: /srv/valid.csv
      validation_fraction: 0.2
      seed: 7
    base_model_name: Qwen/Qwen3-0.6B
    base_model_names: [org/larger]
    n_trials: 20
    time_budget: 1h30m
    search_space:
      rank: [8, 16]
      learningRate: {low: 1e-4, high: 1.0e-3, log: true}
    training: {max_seq_length: 256, warmup_ratio: 0.1}
"""


def parse(text: str, folder: Path = Path("/etc/loratune")) -> Any:
    return parse_projects(text, folder, search_space_from_json)


def test_the_file_parses_into_projects_by_id() -> None:
    payments, support = parse(GOOD)
    assert (payments.project_id, payments.name) == (123, "payments")
    # A relative path is joined to the file's folder; a URI and an absolute path stay.
    assert payments.dataset == DatasetRef(
        uri="/etc/loratune/data/payments.csv",
        task="classification",
        format="csv",
        text_field="comment",
        label_field="code",
        validation_uri="/srv/valid.csv",
        validation_fraction=0.2,
        seed=7,
    )
    assert payments.base_model_name == "Qwen/Qwen3-0.6B" and payments.n_trials == 20
    assert payments.time_budget_seconds == 5400
    assert payments.base_model_names == ("org/larger",)
    # The contract's JSON, either key style, as a request's (snake_case) search space.
    assert payments.search_space == {
        "rank": [8, 16],
        "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
    }
    assert payments.training == TrainingOverrides(max_seq_length=256, warmup_ratio=0.1)
    assert support.dataset.uri == "s3://bucket/support.jsonl"
    assert support.dataset.task == "generation" and support.dataset.prompt_field == "question"
    assert support.use_llm_judge and support.judge_model_id == "gemini"
    assert parse("projects: []") == ()


ENTRY = "projects:\n  - {id: 5, name: a, dataset: {uri: a.csv, task_type: classification}}\n"


def entry(**changes: str) -> str:
    """A one-project file with `changes` as YAML flow fields of the entry."""
    fields = {"id": "5", "name": "a", "dataset": "{uri: a.csv, task_type: classification}"}
    fields.update(changes)
    body = ", ".join(f"{k}: {v}" for k, v in fields.items() if v != "DROP")
    return f"projects:\n  - {{{body}}}\n"


BAD = [
    (
        ENTRY + "  - {id: 5, name: b, dataset: {uri: b.csv, task_type: generation}}\n",
        "projects[1].id",
        "also the id of projects[0]",
    ),
    (
        ENTRY + "  - {id: 6, name: a, dataset: {uri: b.csv, task_type: generation}}\n",
        "projects[1].name",
        "also the name of projects[0]",
    ),
    (
        entry(dataset="{uri: a.csv, task_type: regression}"),
        "projects[0].dataset.task_type",
        "got 'regression' (project 5)",
    ),
    (entry(dataset="{uri: a.csv}"), "projects[0].dataset.task_type", "is required"),
    (entry(dataset="{task_type: generation}"), "projects[0].dataset.uri", "is required"),
    (
        entry(dataset="{uri: a.csv, task_type: generation, text_feild: x}"),
        "projects[0].dataset.text_feild",
        "unknown field",
    ),
    (
        entry(dataset="{uri: a.csv, task_type: generation, format: xml}"),
        "projects[0].dataset.format",
        "got 'xml'",
    ),
    (
        entry(dataset="{uri: a.csv, task_type: generation, validation_fraction: 1.5}"),
        "projects[0].dataset.validation_fraction",
        "below 1",
    ),
    (
        entry(dataset='{uri: a.csv, task_type: generation, text_field: "t\\x1b[31m"}'),
        "projects[0].dataset.text_field",
        "control characters",
    ),
    (entry(dataset="[a.csv]"), "projects[0].dataset", "got a list"),
    (entry(id="true"), "projects[0].id", "whole number"),
    (entry(id='"123"'), "projects[0].id", "whole number"),
    (entry(id="0"), "projects[0].id", "between 1 and"),
    (entry(id="DROP"), "projects[0].id", "is required"),
    (entry(name='"two\\nlines"'), "projects[0].name", "control characters"),
    (entry(name='"' + "x" * 101 + '"'), "projects[0].name", "at most 100"),
    (entry(name='"  "'), "projects[0].name", "must not be empty"),
    (entry(n_trials="3"), "projects[0].n_trials", "between 5 and 100"),
    (entry(time_budget="soon"), "projects[0].time_budget", "such as 90m"),
    (entry(base_model_names="org/x"), "projects[0].base_model_names", "must be a list"),
    (entry(base_model_names="[org/x]"), "projects[0].base_model_names", "needs base_model_name"),
    (
        entry(base_model_name="org/a", base_model_names='[""]'),
        "projects[0].base_model_names[0]",
        "hub name or a path",
    ),
    (entry(time_budget="40d"), "projects[0].time_budget", "30 days"),
    (entry(use_llm_judge="true"), "projects[0].use_llm_judge", "classification"),
    (entry(use_llm_judge="yes please"), "projects[0].use_llm_judge", "true or false"),
    (entry(judge_model_id='"gem ini"'), "projects[0].judge_model_id", "may contain only"),
    (entry(search_space="{rnak: [8]}"), "projects[0].search_space", 'no field named "rnak"'),
    (
        entry(search_space="{learning_rate: {low: 1.0, high: 0.1}}"),
        "projects[0].search_space.learning_rate",
        "inverted",
    ),
    (entry(training="{max_seq_length: -1}"), "projects[0].training.max_seq_length", "between"),
    (entry(training="{batch_size: 4}"), "projects[0].training.batch_size", "unknown field"),
    (entry(owner="me"), "projects[0].owner", "unknown field"),
    ("projects:\n  - just a name\n", "projects[0]", "must be a mapping"),
    ("- id: 5\n", "projects", "'projects' list"),
    ("", "projects", "'projects' list"),
    ("projects: []\nextra: 1\n", "extra", "unknown top-level key"),
]


@pytest.mark.parametrize(("text", "field", "words"), BAD)
def test_a_bad_entry_is_refused_naming_the_entry_and_field(
    text: str, field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(text)
    assert caught.value.field == field, caught.value
    assert words in caught.value.message, caught.value
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


def test_broken_yaml_and_repeated_keys_say_where() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse("projects:\n  - {id: 5, name: [\n")
    assert "not valid YAML at line 3" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        parse("projects:\n  - id: 5\n    id: 6\n")
    assert "key 'id' is given twice" in caught.value.message
    assert "line 3" in caught.value.message


def write(path: Path, text: str) -> None:
    """Replaces the file as editors and `kubectl` do: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def two_projects() -> str:
    return ENTRY + "  - {id: 6, name: b, dataset: {uri: b.jsonl, task_type: generation}}\n"


def test_the_file_is_read_again_when_it_changes_and_only_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "projects.yaml"
    path.write_text(ENTRY)
    catalog = ProjectCatalog(path, search_space_from_json)
    reads = []
    from services.optimizer.core import projects as module

    real = module.read_projects
    monkeypatch.setattr(module, "read_projects", lambda *a: reads.append(1) or real(*a))
    assert [p.project_id for p in catalog.current().projects] == [5]
    catalog.current()
    catalog.get(5)
    assert len(reads) == 1  # unchanged: one stat a use, no read
    write(path, two_projects())  # replaced by rename
    assert [p.project_id for p in catalog.current().projects] == [5, 6]
    with path.open("a") as f:  # edited in place
        f.write("  - {id: 7, name: c, dataset: {uri: c.csv, task_type: classification}}\n")
    assert catalog.get(7).name == "c"
    assert len(reads) == 3


def test_a_configmap_update_by_link_swap_is_seen(tmp_path: Path) -> None:
    # Kubernetes mounts projects.yaml -> ..data/projects.yaml, ..data -> ..<timestamp>/, and
    # updates by writing a new timestamped folder and renaming a new ..data link over the old.
    mount = tmp_path / "config"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "projects.yaml").write_text(ENTRY)
    (mount / "..data").symlink_to("..v1")
    (mount / "projects.yaml").symlink_to("..data/projects.yaml")
    catalog = ProjectCatalog(mount / "projects.yaml", search_space_from_json)
    project = catalog.get(5)
    # Relative to the folder the file is mounted in, not to the link's hidden target.
    assert project.dataset.uri == str(mount / "a.csv")
    (mount / "..v2").mkdir()
    (mount / "..v2" / "projects.yaml").write_text(two_projects())
    (mount / "..data_tmp").symlink_to("..v2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert [p.project_id for p in catalog.current().projects] == [5, 6]


def test_a_bad_edit_keeps_the_last_good_set_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "projects.yaml"
    path.write_text(two_projects())
    catalog = ProjectCatalog(path, search_space_from_json)
    assert len(catalog.current().projects) == 2
    write(path, entry(dataset="{uri: a.csv, task_type: regression}"))
    with caplog.at_level(logging.ERROR, logger="services.optimizer.core.projects"):
        current = catalog.current()
        catalog.current()
        catalog.get(6)
    assert [p.project_id for p in current.projects] == [5, 6]
    assert str(path) in current.problem
    assert "projects[0].dataset.task_type" in current.problem
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and current.problem in errors[0]
    assert "last good version (2 projects)" in errors[0]
    write(path, ENTRY)
    current = catalog.current()
    assert [p.project_id for p in current.projects] == [5] and current.problem == ""


def test_a_bad_or_missing_file_at_start_serves_none_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "projects.yaml"
    catalog = ProjectCatalog(path, search_space_from_json)
    assert catalog.current().projects == ()
    assert "cannot be read (No such file or directory)" in catalog.current().problem
    path.write_text("projects: [")
    assert "not valid YAML" in catalog.current().problem
    with pytest.raises(NotFound) as caught:
        catalog.get(123)
    assert str(caught.value).startswith("project 123 not found (the projects file's latest")
    path.write_text(ENTRY)
    assert catalog.get(5).name == "a"


def test_without_a_file_there_are_no_projects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUNE_PROJECTS", "")
    assert OptimizerSettings().projects_file() is None
    monkeypatch.setenv("LORATUNE_PROJECTS", "/etc/loratune/projects.yaml")
    assert OptimizerSettings().projects_file() == Path("/etc/loratune/projects.yaml")
    catalog = ProjectCatalog(None)
    assert catalog.current().projects == ()
    with pytest.raises(NotFound) as caught:
        catalog.get(123)
    assert str(caught.value) == (
        "project 123 not found (no projects are configured: LORATUNE_PROJECTS is not set)"
    )


def request(**kw: Any) -> StudyRequest:
    values: dict[str, Any] = {
        "project_id": 123,
        "study_name": "",
        "fine_tuning": FineTuning(),
        "dataset": None,
    }
    return StudyRequest(**{**values, **kw})


def test_a_request_takes_the_projects_data_and_what_it_leaves_unset() -> None:
    payments, _ = parse(GOOD)
    filled = apply_project(
        request(search_space={"rank": [4]}, training=TrainingOverrides(warmup_ratio=0.3)),
        payments,
    )
    assert filled.dataset == payments.dataset
    assert filled.fine_tuning == FineTuning(
        use_llm_judge=False,
        base_model_name="Qwen/Qwen3-0.6B",
        n_trials=20,
        time_budget_seconds=5400,
        base_model_names=("org/larger",),
    )
    assert filled.search_space == {
        "rank": [4],
        "learning_rate": payments.search_space["learning_rate"],
    }
    assert filled.training == TrainingOverrides(max_seq_length=256, warmup_ratio=0.3)
    mine = FineTuning(base_model_name="org/m", n_trials=8, time_budget_seconds=60)
    assert apply_project(request(fine_tuning=mine), payments).fine_tuning == mine

    _, support = parse(GOOD)
    # The judge on / off default holds when the request has no fine_tuning_params at all.
    assert apply_project(request(fine_tuning_given=False), support).fine_tuning == FineTuning(
        use_llm_judge=True, judge_model_id="gemini"
    )
    off = apply_project(request(fine_tuning=FineTuning(use_llm_judge=False)), support)
    assert not off.fine_tuning.use_llm_judge and not off.fine_tuning.judge_model_id
    on = apply_project(request(fine_tuning=FineTuning(use_llm_judge=True)), support)
    assert on.fine_tuning.judge_model_id == "gemini"
    chosen = FineTuning(use_llm_judge=True, judge_model_id="gigachat")
    assert apply_project(request(fine_tuning=chosen), support).fine_tuning == chosen


def test_a_request_with_a_dataset_keeps_it_and_needs_no_project() -> None:
    own = DatasetRef(uri="/x.csv")
    catalog = ProjectCatalog(None)
    mine = request(project_id=999, dataset=own)
    assert with_project(mine, catalog) == (mine, own)
    with pytest.raises(InvalidArgument) as caught:
        with_project(request(project_id=0), catalog)
    assert caught.value.field == "dataset"
    with pytest.raises(InvalidArgument) as caught:
        with_project(request(project_id=-4), catalog)
    assert caught.value.field == "project_id"
    with pytest.raises(NotFound):
        with_project(request(project_id=999), catalog)


def test_a_name_is_for_people_in_any_language() -> None:
    (project,) = parse(entry(name='"Платежи по счетам 2026"'))
    assert project.name == "Платежи по счетам 2026"
    (odd,) = parse(entry(name="\"<b>'Q1' & ../etc</b>\""))
    assert odd.name == "<b>'Q1' & ../etc</b>"  # kept as written; shown escaped
