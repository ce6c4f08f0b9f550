"""Regenerates the Python code of protos/, or checks (--check) that the committed code matches."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _protos() -> list[Path]:
    return sorted(PROTO_ROOT.glob("loratune/*/v1/*.proto"))


def _generate(out: Path) -> None:
    """Runs protoc (from grpcio-tools) with the mypy-protobuf plugins into `out`."""
    protos = [str(p.relative_to(PROTO_ROOT)) for p in _protos()]
    # The mypy-protobuf plugins live beside the interpreter, which need not be on PATH.
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)


def _generated(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(SUFFIXES)
    }


def main() -> int:
    """Entry point: regenerate, or with --check report drift and exit 1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the code has drifted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _generate(out)
        fresh = _generated(out)
        committed = _generated(PROTO_ROOT)
        if args.check:
            drift = sorted(
                name
                for name in fresh.keys() | committed.keys()
                if name not in fresh
                or name not in committed
                or not filecmp.cmp(fresh[name], committed[name], shallow=False)
            )
            if drift:
                print("generated code drifted from the protos; run `make protos`:", file=sys.stderr)
                for name in drift:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print(f"generated code matches the protos ({len(fresh)} files)")
            return 0
        for name in committed.keys() - fresh.keys():
            committed[name].unlink()
        for name, path in fresh.items():
            target = PROTO_ROOT / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        print(f"generated {len(fresh)} files under {PROTO_ROOT}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
