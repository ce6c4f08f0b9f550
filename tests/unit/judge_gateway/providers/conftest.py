"""Fixtures for the provider adapter tests: fake provider APIs on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.fakes.gemini import FakeGemini
from tests.fakes.gigachat import FakeGigaChat
from tests.fakes.openai import FakeOpenAI


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


@pytest.fixture
def fake_gigachat() -> Iterator[FakeGigaChat]:
    with FakeGigaChat() as fake:
        yield fake


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def refused_url() -> Iterator[str]:
    """An http URL on 127.0.0.1 where nothing listens: connecting is refused at once.

    The port stays bound (never listening) for the whole test: a port merely found free
    may be taken by any other process's server before the test connects to it.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
