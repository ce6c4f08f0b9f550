"""Surviving providers: retries with backoff and a budget, and a circuit breaker."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.judge_gateway.core.providers.base import ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, Retry-After honoured, bounded by a budget."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0
    budget_seconds: float = 60.0

    def delay(self, attempt: int, error: ProviderError, rng: random.Random) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempts count from 1)."""
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        jittered = rng.uniform(backoff / 2, backoff)
        if error.retry_after is not None:
            # The provider said when; never sooner, a little later spreads callers out.
            return max(error.retry_after, 0.0) + rng.uniform(0, self.base_delay / 4)
        return jittered


class CircuitOpenError(Exception):
    """The provider's breaker is open: failing fast until its cool-down ends."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit open; next probe in {retry_in:.1f} s")
        self.retry_in = retry_in


class CircuitBreaker:
    """Opens after `threshold` consecutive failures, stays open for `cooldown` seconds,
    then lets one probe through: success closes it, failure opens it again."""

    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """Whether calls are being refused (open, or half-open with a probe in flight)."""
        return self._opened_at is not None

    def before_call(self) -> None:
        """Raises CircuitOpenError unless a call may go out now."""
        if self._opened_at is None:
            return
        remaining = self._opened_at + self.cooldown - self._clock()
        if remaining > 0 or self._probing:
            raise CircuitOpenError(max(remaining, 0.0))
        self._probing = True  # half-open: this caller is the probe

    def record_success(self) -> None:
        """A call went through: closes the breaker."""
        self._failures = 0
        self._probing = False
        if self._opened_at is not None:
            self._opened_at = None
            if self._on_change:
                self._on_change(False)

    def record_failure(self) -> None:
        """A call failed in a way that says the provider is unwell."""
        self._failures += 1
        was_open = self._opened_at is not None
        if self._probing or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._probing = False
            if not was_open and self._on_change:
                self._on_change(True)

    def record_neutral(self) -> None:
        """A call ended in a way that says nothing of the provider's health (a bad request)."""
        self._probing = False
