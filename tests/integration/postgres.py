"""A real PostgreSQL server in a temporary folder (Debian's initdb / pg_ctl), for the tests
and the benchmarks that need Optuna's storage on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def available() -> bool:
    """Whether the PostgreSQL binaries are installed."""
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_server(max_connections: int = 100) -> Iterator[str]:
    """Starts a server, yields its SQLAlchemy URL, stops it and removes its folder."""
    # The server's own user must reach its folder (pytest's tmp_path is private to root).
    base = Path(tempfile.mkdtemp(prefix="loratune-pg-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    port = _free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*prefix, "initdb", "-D", str(data), "-U", "loratune", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}"
    )
    subprocess.run(
        [*prefix, "pg_ctl", "-D", str(data), "-w", "-l", str(data / "log"), "-o", options, "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://loratune@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)
