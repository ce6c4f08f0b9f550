"""The one rule from an error to the `loratune` exit code, and the one way it is printed.

0: done (a study: it completed). 1: it failed or was cancelled, or a service could not be
reached or answered otherwise (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``INTERNAL``, ...).
2: the request was refused as it stands (``INVALID_ARGUMENT``, ``NOT_FOUND``,
``ALREADY_EXISTS``, ``FAILED_PRECONDITION``, ``OUT_OF_RANGE``) or the command line was
wrong: retrying it unchanged cannot help. 130: Ctrl-C stopped a command that follows a
study. The same for every command, whether the error came over gRPC or from a core run
in this process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import typer
from rich.console import Console
from rich.markup import escape

from services.common.errors import LoratuneError

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_REFUSED",
    "REFUSED_CODES",
    "exit_code",
    "exit_for",
    "run_rpc",
    "usage_error",
]

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130  # Ctrl-C while following: 128 + SIGINT, as a shell reports it

# Status codes that mean the request itself was wrong: retrying it unchanged cannot help.
REFUSED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_REFUSED_NAMES = frozenset(code.name for code in REFUSED_CODES)

stderr = Console(stderr=True)


def exit_code(code: grpc.StatusCode | str) -> int:
    """2 for a refused request, 1 for any other failure; ``code`` may be a status name."""
    name = code.name if isinstance(code, grpc.StatusCode) else code
    return EXIT_REFUSED if name in _REFUSED_NAMES else EXIT_FAILED


def exit_for(err: LoratuneError | grpc.aio.AioRpcError) -> typer.Exit:
    """Prints ``error (CODE): field: message`` to stderr; returns the exit to raise."""
    if isinstance(err, LoratuneError):
        code, message = err.code, str(err)
    else:
        code, message = err.code().name, err.details() or ""
    stderr.print(f"[red]error ({code}):[/red] {escape(message)}".rstrip(), soft_wrap=True)
    return typer.Exit(exit_code(code))


def run_rpc(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a command's calls; a gRPC or domain error ends the command by the rule above."""
    try:
        return asyncio.run(coro)
    except (LoratuneError, grpc.aio.AioRpcError) as err:
        raise exit_for(err) from None


def usage_error(message: str) -> typer.Exit:
    """Prints ``error: message`` for a wrong command line; returns the exit (2) to raise."""
    stderr.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(EXIT_REFUSED)
