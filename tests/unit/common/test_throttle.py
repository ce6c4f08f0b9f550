"""The per-address slow-down of failed authentication."""

from __future__ import annotations

from services.common.throttle import AuthThrottle, client_of_peer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_free_tries_then_doubling_delays_for_that_address_only() -> None:
    clock = Clock()
    throttle = AuthThrottle(free_failures=3, base_delay=1.0, max_delay=8.0, clock=clock)
    for _ in range(3):
        throttle.failed("10.0.0.7", "api")
        assert throttle.retry_after("10.0.0.7") is None
    delays = []
    for _ in range(6):
        throttle.failed("10.0.0.7", "api")
        delays.append(throttle.retry_after("10.0.0.7"))
    assert delays == [1, 2, 4, 8, 8, 8]  # doubling, capped
    # One client never locks out another.
    assert throttle.retry_after("10.0.0.8") is None and throttle.any_blocked()
    clock.now += 8.5
    assert throttle.retry_after("10.0.0.7") is None and not throttle.any_blocked()


def test_a_right_credential_or_a_long_quiet_starts_the_address_afresh() -> None:
    clock = Clock()
    throttle = AuthThrottle(free_failures=1, forget_after=60.0, clock=clock)
    throttle.failed("a", "sign_in")
    throttle.succeeded("a")
    throttle.failed("a", "sign_in")
    assert throttle.retry_after("a") is None  # the count restarted
    clock.now += 61
    throttle.failed("a", "sign_in")
    assert throttle.retry_after("a") is None  # forgotten after a quiet minute


def test_memory_stays_bounded_whatever_addresses_arrive() -> None:
    throttle = AuthThrottle(free_failures=0, max_clients=100)
    for i in range(1000):
        throttle.failed(f"10.1.{i // 256}.{i % 256}", "grpc")
    assert len(throttle._clients) == 100
    assert throttle.retry_after("10.1.3.231") is not None  # the newest are kept


def test_a_peer_is_its_address_whatever_the_port() -> None:
    assert client_of_peer("ipv4:10.0.0.7:5123") == "10.0.0.7"
    assert client_of_peer("ipv6:[::1]:5123") == "::1"
    assert client_of_peer("unix:/tmp/s") == "unix:/tmp/s"
    assert client_of_peer(None) == "unknown"
