"""deploy/Dockerfile: non-root, no secret baked in, every COPY source present, and (slow)
its install commands, run in a fresh virtual environment, give a working `loratune`.

There is no Docker engine here: the slow test replays the recipe's `pip install` lines
in order, with the COPY'd files laid out as in the image's WORKDIR, in a venv made by
`python -m venv` (never --system-site-packages), with the CPU lock (`LOCK=cpu`): the CUDA
set is the same versions but torch's build and its nvidia-* wheels (several GB).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.deploy.conftest import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SECRET_NAME = re.compile(r"TOKEN|KEY|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)
IMAGE_UID = 10001
# The build arguments the replay uses (a `docker build --build-arg` each).
REPLAY_ARGS = {"LOCK": "cpu"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    """{name: version} of a lock file (`name==version \\` lines)."""
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)", line)
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


def _build_args() -> dict[str, str]:
    """ARG defaults, overridden as `docker build --build-arg` would with REPLAY_ARGS."""
    values: dict[str, str] = {}
    for keyword, arguments in _instructions():
        if keyword == "ARG":
            values.update({k: v for k, v in _assignments(arguments).items() if v})
    return values | REPLAY_ARGS


def _expand(text: str, values: dict[str, str]) -> str:
    """`${NAME}` / `$NAME` replaced as Docker does in COPY sources (unknown: an error here)."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values[m.group(1)], text)


def _assignments(arguments: str) -> dict[str, str]:
    """`ENV A=1 B=2` / `ARG A=1` / legacy `ENV A 1` as a dict (no value: "")."""
    words = shlex.split(arguments)
    if words and "=" not in words[0] and len(words) > 1:
        return {words[0]: " ".join(words[1:])}
    return {w.partition("=")[0]: w.partition("=")[2] for w in words}


def test_the_image_runs_as_a_non_root_user() -> None:
    instructions = _instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    if not user.isdigit():
        created = [
            a for k, a in instructions if k == "RUN" and "useradd" in a and a.split()[-1] == user
        ]
        assert created, f"USER {user} is never created"
        words = shlex.split(created[0])
        user = words[words.index("--uid") + 1]
    assert int(user) == IMAGE_UID != 0  # the uid the manifests' runAsUser names
    # USER comes after every install, and nothing runs as root after it.
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert all(k != "RUN" for k, _ in instructions[last_user:])
    assert ("ENTRYPOINT", '["loratune"]') in instructions


def test_no_secret_is_baked_in() -> None:
    for keyword, arguments in _instructions():
        if keyword in {"ENV", "ARG", "LABEL"}:
            for name, value in _assignments(arguments).items():
                assert not (SECRET_NAME.search(name) and value), f"{keyword} {name} holds a value"
    assert not list((ROOT / "deploy").glob("*.env"))


def test_every_copy_source_exists() -> None:
    copies = [a for k, a in _instructions() if k in {"COPY", "ADD"}]
    assert copies
    for arguments in copies:
        words = [w for w in shlex.split(arguments) if not w.startswith("--")]
        if "${LOCK}" in arguments:  # every lock the build argument may name is there
            for lock in ("cpu", "cuda"):
                assert (ROOT / _expand(words[0], {"LOCK": lock})).is_file(), lock
            words = [_expand(w, _build_args()) for w in words]
        for source in words[:-1]:
            assert (ROOT / source).exists(), source
        # Never the whole context: no stray secrets or runs/ in the image.
        assert "." not in words[:-1], arguments


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_install_commands_give_a_working_loratune(tmp_path: Path) -> None:
    instructions = _instructions()
    (base,) = [a for k, a in instructions if k == "FROM"]
    version = re.search(r"python:(\d+\.\d+)", base)
    assert version, base
    if version.group(1) != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the image is {version.group(1)}, this interpreter is not")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    config = (venv / "pyvenv.cfg").read_text(encoding="utf-8")
    assert "include-system-site-packages = false" in config
    python = venv / "bin" / "python"
    app = tmp_path / "app"  # the image's WORKDIR
    app.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    installs = 0
    build_args = _build_args()
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(_assignments(arguments))
        elif keyword == "COPY":
            *sources, target = [
                _expand(w, build_args) for w in shlex.split(arguments) if not w.startswith("--")
            ]
            for source in sources:
                destination = (
                    app / target / Path(source).name if target.endswith("/") else app / target
                )
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source,
                        destination,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"),
                    )
                else:
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, destination)
        elif keyword == "RUN" and arguments.startswith("pip install"):
            words = shlex.split(arguments)
            result = subprocess.run(
                [str(python), "-m", *words],
                cwd=app,
                env=env,
                capture_output=True,
                text=True,
                timeout=780,
                check=False,
            )
            assert result.returncode == 0, (
                f"{arguments}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
            installs += 1
    assert installs >= 2
    # Installed from the lock and nothing else: every package at the version it pins.
    pinned = _pins(ROOT / "requirements" / f"{build_args['LOCK']}.txt")
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    installed = {_normalise(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    installed.pop("pip", None)
    installed.pop("loratune", None)
    assert installed == pinned
    loratune = venv / "bin" / "loratune"
    for command in (["--help"], ["serve", "optimizer", "--help"], ["tune", "--help"]):
        result = subprocess.run(
            [str(loratune), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"loratune {' '.join(command)}:\n{result.stderr[-3000:]}"
    # The cluster's storage driver and discovery client are in the image.
    check = subprocess.run(
        [str(python), "-c", "import psycopg, kubernetes, optuna, torch, peft"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert check.returncode == 0, check.stderr[-3000:]
