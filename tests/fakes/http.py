"""A scriptable HTTP/1.1 server on 127.0.0.1 that the fake provider APIs build on."""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

DEFAULT_JUDGMENT: dict[str, Any] = {
    "reasoning": "The candidate states the same facts as the reference.",
    "score": 80,
}
DEFAULT_JUDGMENT_TEXT = json.dumps(DEFAULT_JUDGMENT)

# The JSON schema the tests ask the judge to follow.
JUDGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["reasoning", "score"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str  # without the query string
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, a dict for a form, else None
    raw_body: bytes

    def header(self, name: str) -> str | None:
        """The value of a header, by case-insensitive name."""
        return self.headers.get(name.lower())


Renderer = Callable[["FakeServer", RecordedRequest], "Reply"]


@dataclass(frozen=True)
class Reply:
    """What the fake answers: a concrete HTTP response, or a recipe the fake renders.

    Recipes (`json_text`, `error`, `max_tokens_empty`) are rendered by each fake in its
    own provider's wire format, so one test script reads the same for every provider.
    """

    status: int = 200
    body: Any = None  # serialised as JSON
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent verbatim instead of `body`
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection without answering
    render: Renderer | None = None

    @classmethod
    def json_text(cls, text: str, finish: str = "STOP") -> Reply:
        """A successful answer whose text is `text`.

        `finish` uses Gemini's names (STOP, MAX_TOKENS, SAFETY); the other fakes translate
        them to theirs, and pass any other value through unchanged.
        """
        return cls(render=lambda fake, request: fake.render_text(request, text, finish))

    @classmethod
    def error(
        cls,
        status: int,
        *,
        retry_after: float | str | None = None,
        message: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> Reply:
        """An error in the provider's shape; `retry_after` adds a Retry-After header."""

        def render(fake: FakeServer, request: RecordedRequest) -> Reply:
            text = message if message is not None else HTTPStatus(status).phrase
            reply = fake.render_error(request, status, text, details)
            if retry_after is not None:
                reply = reply.with_headers({"Retry-After": _format_retry_after(retry_after)})
            return reply

        return cls(render=render)

    @classmethod
    def slow(cls, seconds: float, then: Reply | None = None) -> Reply:
        """Answers `then` (default: the default responder's reply) after `seconds`."""

        def render(fake: FakeServer, request: RecordedRequest) -> Reply:
            # The built-in reply, not `fake.responder`: a responder that itself answers
            # `slow(...)` would otherwise render forever.
            return then if then is not None else fake.default_reply(request)

        return cls(delay=seconds, render=render)

    @classmethod
    def malformed(cls) -> Reply:
        """A 200 whose body claims to be JSON but is cut off."""
        return cls(raw=b'{"choices": [{"message": {"content": "{\\"sco', headers=_JSON)

    @classmethod
    def max_tokens_empty(cls) -> Reply:
        """The output budget ran out before any text (a thinking model's habit)."""
        return cls(render=lambda fake, request: fake.render_max_tokens_empty(request))

    @classmethod
    def disconnect(cls) -> Reply:
        """Closes the connection without sending a response."""
        return cls(drop=True)

    def with_headers(self, headers: Mapping[str, str]) -> Reply:
        """This reply with `headers` added."""
        return replace(self, headers={**self.headers, **headers})


_JSON = {"Content-Type": "application/json"}


def _format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def approx_tokens(text: str) -> int:
    """A stand-in token count: one token per whitespace-separated word."""
    return len(text.split())


class FakeServer:
    """A real HTTP server in a daemon thread, scripted per test.

    Requests go through `route` (the subclass's endpoints and auth checks); when it has
    no answer of its own, the next scripted reply is used, else `responder`.
    """

    def __init__(self, *, latency: float = 0.0) -> None:
        self._initial_latency = latency
        self.latency = latency  # seconds added to every reply
        self.responder: Callable[[RecordedRequest], Reply] = self.default_reply
        self.handler_errors: list[BaseException] = []  # bugs in a fake, kept for debugging
        self._lock = threading.Lock()
        self._script: collections.deque[Reply] = collections.deque()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._peak = 0
        self._opened = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._outage: _Outage | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- provider hooks -------------------------------------------------------------

    def default_reply(self, request: RecordedRequest) -> Reply:
        """The reply used when nothing is scripted: a valid judgment."""
        return Reply.json_text(DEFAULT_JUDGMENT_TEXT)

    def route(self, request: RecordedRequest) -> Reply | None:
        """Answers endpoints and failed checks itself; None lets the script answer."""
        return None

    def render_text(self, request: RecordedRequest, text: str, finish: str) -> Reply:
        """A successful answer in the provider's format."""
        raise NotImplementedError

    def render_error(
        self,
        request: RecordedRequest,
        status: int,
        message: str,
        details: list[dict[str, Any]] | None,
    ) -> Reply:
        """An error in the provider's format."""
        raise NotImplementedError

    def render_max_tokens_empty(self, request: RecordedRequest) -> Reply:
        """A reply cut by the output budget before any text."""
        raise NotImplementedError

    # -- scripting ------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queues replies for the next scripted requests, in order."""
        with self._lock:
            self._script.extend(replies)

    def outage(self, seconds: float, reply: Reply | None = None) -> None:
        """The provider goes away when next asked, for `seconds`: every request in that window
        answers `reply` (default: 503, in the provider's error format) instead of the script
        or the responder; after it, they answer again. Checks of `route` still come first.

        It starts at the next request, not now, so that a test can arm it ahead of the call
        it means to hit however long the work before that call takes.
        """
        default = Reply.error(503, message="The model is overloaded. Please try again later.")
        with self._lock:
            self._outage = _Outage(seconds, reply or default)

    @property
    def outage_replies(self) -> int:
        """Requests answered by the current (or last) outage."""
        with self._lock:
            return self._outage.answered if self._outage is not None else 0

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received since the start or the last reset, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def peak_concurrency(self) -> int:
        """The most requests that were in flight at the same time."""
        with self._lock:
            return self._peak

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted since the start (a pooled one counts once)."""
        with self._lock:
            return self._opened

    def reset(self) -> None:
        """Forgets requests and the script; restores the default responder and latency."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._peak = self._in_flight
            self._outage = None
        self.responder = self.default_reply
        self.latency = self._initial_latency
        self.handler_errors.clear()

    # -- lifecycle ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._server is None:
            raise RuntimeError("the fake server is not started")
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The base URL to give the provider's SDK."""
        return self.origin

    def start(self) -> Self:
        """Binds 127.0.0.1 on a free port and serves in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},  # how soon stop() returns
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes open connections, waking any delayed replies."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- used by the handler threads ------------------------------------------------

    def _enter(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_scripted(self) -> Reply | None:
        with self._lock:
            return self._script.popleft() if self._script else None

    def _in_outage(self) -> Reply | None:
        with self._lock:
            outage = self._outage
            if outage is None:
                return None
            now = time.monotonic()
            if outage.started is None:
                outage.started = now
            if now >= outage.started + outage.seconds:
                return None
            outage.answered += 1
            return outage.reply

    def _reply_for(self, request: RecordedRequest) -> Reply:
        reply = self.route(request)
        if reply is None:
            reply = self._in_outage() or self._next_scripted() or self.responder(request)
        delay = 0.0
        for _ in range(_MAX_RENDER_DEPTH):
            if reply.render is None:
                break
            delay += reply.delay
            reply = reply.render(self, request)
        else:
            raise RuntimeError(f"reply still rendering after {_MAX_RENDER_DEPTH} steps")
        return replace(reply, delay=delay + reply.delay)


_MAX_RENDER_DEPTH = 16


@dataclass
class _Outage:
    """A window in which every request gets `reply`; it opens at the first request."""

    seconds: float
    reply: Reply
    started: float | None = None
    answered: int = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' pools expect
    # Headers and body go out in two writes; with Nagle on, the body waits for an ACK.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        fake = self.server.fake
        with fake._lock:
            fake._connections.add(self.connection)
            fake._opened += 1

    def finish(self) -> None:
        fake = self.server.fake
        with fake._lock:
            fake._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = _record(self.command, self.path, dict(self.headers.items()), raw)
        fake._enter(request)
        try:
            try:
                reply = fake._reply_for(request)
            except Exception as exc:  # a bug in a fake: answer 500 and keep it for the test
                fake.handler_errors.append(exc)
                reply = Reply(status=500, body={"error": f"fake server bug: {exc!r}"})
            delay = fake.latency + reply.delay
            if delay > 0 and fake._stopping.wait(delay):
                reply = Reply(drop=True)
            if reply.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._write(reply)
        finally:
            fake._leave()

    def _write(self, reply: Reply) -> None:
        if reply.raw is not None:
            payload = reply.raw
        elif reply.body is None:
            payload = b""
        else:
            payload = json.dumps(reply.body, ensure_ascii=False).encode()
        self.send_response(reply.status)
        headers = dict(reply.headers)
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the tests read `requests` instead."""


def _record(method: str, target: str, headers: dict[str, str], raw: bytes) -> RecordedRequest:
    parts = urlsplit(target)
    lowered = {name.lower(): value for name, value in headers.items()}
    content_type = lowered.get("content-type", "").partition(";")[0].strip()
    body: Any = None
    if content_type == "application/x-www-form-urlencoded":
        body = dict(parse_qsl(raw.decode("utf-8", "replace")))
    elif raw:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    return RecordedRequest(
        method=method,
        path=parts.path,
        query=dict(parse_qsl(parts.query)),
        headers=lowered,
        body=body,
        raw_body=raw,
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not hold up stop()
    request_queue_size = 1024  # a few hundred clients connect at once in the load tests

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silent: clients that time out hang up mid-reply by design."""
