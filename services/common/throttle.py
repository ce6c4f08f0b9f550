"""Failed authentication slows down, per client address.

Every service's token check (gRPC, `interceptors.AuthInterceptor`) and the console's (its
bearer header, session cookie and sign-in form) record a wrong credential here. An
address gets `free_failures` wrong tries at full speed; after that it is refused for a
delay that doubles with every further failure (1 s, 2 s, 4 s ... up to `max_delay`), with
`429` / `RESOURCE_EXHAUSTED` and a `Retry-After`. While it is refused its credentials are
not even compared, so guessing cannot go faster than the delays allow. Other addresses
are never affected; a correct credential resets its address. An address forgotten
`forget_after` seconds after its last failure starts afresh, and at most `max_clients`
addresses are remembered (the oldest go first), so memory stays bounded whatever arrives.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

__all__ = ["AUTH_FAILURES", "AuthThrottle", "client_of_peer"]

# Wrong credentials, by where they were given (grpc, api, page, sign_in), and refusals of
# an address that was slowed down.
AUTH_FAILURES = Counter(
    "loratune_auth_failures_total",
    "Wrong credentials (bearer token, session cookie, sign-in form), by where they came.",
    ["path"],
)
AUTH_THROTTLED = Counter(
    "loratune_auth_throttled_total",
    "Requests refused because their address failed authentication too often, by path.",
    ["path"],
)
PATHS = ("grpc", "api", "page", "sign_in")
for _path in PATHS:
    AUTH_FAILURES.labels(path=_path)
    AUTH_THROTTLED.labels(path=_path)


@dataclass
class _Client:
    failures: int = 0
    blocked_until: float = 0.0
    last_failure: float = 0.0


class AuthThrottle:
    """Per-address failure counts and the delays they earn (thread-safe)."""

    def __init__(
        self,
        *,
        free_failures: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        forget_after: float = 900.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = max(free_failures, 0)
        self._base = base_delay
        self._max = max_delay
        self._forget_after = forget_after
        self._max_clients = max(max_clients, 1)
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int | None:
        """Whole seconds `client` must wait before its credentials are looked at again;
        None when it may try now."""
        now = self._clock()
        with self._lock:
            state = self._clients.get(client)
            if state is None or state.blocked_until <= now:
                return None
            return max(1, math.ceil(state.blocked_until - now))

    def any_blocked(self) -> bool:
        """Whether some address is refused now (a fast path for callers)."""
        now = self._clock()
        with self._lock:
            return any(state.blocked_until > now for state in self._clients.values())

    def failed(self, client: str, path: str) -> None:
        """Records a wrong credential from `client`, given at `path`."""
        AUTH_FAILURES.labels(path=path if path in PATHS else "api").inc()
        now = self._clock()
        with self._lock:
            state = self._clients.get(client)
            if state is None or now - state.last_failure > self._forget_after:
                state = _Client()
            state.failures += 1
            state.last_failure = now
            beyond = state.failures - self._free
            if beyond > 0:
                delay = min(self._max, self._base * 2 ** min(beyond - 1, 30))
                state.blocked_until = now + delay
            self._clients[client] = state
            self._clients.move_to_end(client)
            while len(self._clients) > self._max_clients:
                self._clients.popitem(last=False)

    def refused(self, path: str) -> None:
        """Counts a request refused for its address's failures."""
        AUTH_THROTTLED.labels(path=path if path in PATHS else "api").inc()

    def succeeded(self, client: str) -> None:
        """A correct credential: the address starts afresh."""
        with self._lock:
            self._clients.pop(client, None)


def client_of_peer(peer: str | None) -> str:
    """The address part of a gRPC peer (`ipv4:10.0.0.7:5123`, `ipv6:[::1]:5123`,
    `unix:/path`): one client however many connections or ports it uses."""
    if not peer:
        return "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or rest
    return peer
