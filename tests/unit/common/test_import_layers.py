"""Imports go with the grain: shared pieces live below the services that use them.

- services/common imports no service, the CLI or the console;
- a service's core (services/<service>/core) imports only its own service and common;
- the console does not import the CLI (both sit on common).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[3] / "services"
TOP = ("cli", "console", "optimizer", "trainer", "evaluator", "judge_gateway")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("services.")}


def _areas(path: Path) -> set[str]:
    return {name.split(".")[1] for name in _imports(path)}


def _files(*parts: str) -> list[Path]:
    return sorted(SERVICES.joinpath(*parts).rglob("*.py"))


@pytest.mark.parametrize("path", _files("common"), ids=lambda p: p.name)
def test_common_imports_no_service(path: Path) -> None:
    assert _areas(path) <= {"common"}, _imports(path)


@pytest.mark.parametrize(
    "path",
    [p for service in TOP[2:] for p in _files(service, "core")],
    ids=lambda p: str(p.relative_to(SERVICES)),
)
def test_a_services_core_imports_only_itself_and_common(path: Path) -> None:
    service = path.relative_to(SERVICES).parts[0]
    assert _areas(path) <= {"common", service}, _imports(path)


@pytest.mark.parametrize("path", _files("console"), ids=lambda p: p.name)
def test_the_console_does_not_import_the_cli(path: Path) -> None:
    assert "cli" not in _areas(path), _imports(path)
