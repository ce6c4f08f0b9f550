"""Prometheus metrics of the trainer."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

JOBS = Counter("loratune_trainer_jobs_total", "Training jobs finished, by outcome.", ["outcome"])
BUSY = Gauge("loratune_trainer_busy", "1 while a job is running.")
STEP_SECONDS = Histogram(
    "loratune_trainer_step_seconds",
    "Time of one optimizer step.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SAMPLES_PER_SECOND = Gauge(
    "loratune_trainer_samples_per_second", "Training throughput of the running job."
)
MODEL_LOAD_SECONDS = Histogram(
    "loratune_trainer_model_load_seconds",
    "Time to load a base model (cache misses only).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ACCELERATOR_MEMORY = Gauge(
    "loratune_trainer_accelerator_memory_bytes",
    "Accelerator memory, by kind (allocated, reserved, total).",
    ["kind"],
)
TOKENIZATION_CACHE_HITS = Counter(
    "loratune_trainer_tokenization_cache_hits_total", "Jobs that reused a tokenised dataset."
)
TOKENIZATION_CACHE_MISSES = Counter(
    "loratune_trainer_tokenization_cache_misses_total", "Jobs that tokenised their dataset."
)
SAMPLES = Counter(
    "loratune_trainer_samples_total",
    "Training rows processed by optimizer steps (rate() is the throughput over any window).",
)
GENERATED_TOKENS = Counter(
    "loratune_trainer_generated_tokens_total",
    "Tokens generated for validation predictions (generation tasks).",
)
GENERATION_TOKENS_PER_SECOND = Gauge(
    "loratune_trainer_generation_tokens_per_second",
    "Generation speed of the last validation pass (generated tokens / its seconds).",
)


class TrainerClock:
    """Seconds this trainer has been busy (a job running) and idle since it started: a GPU
    held by an idle trainer is paid for all the same (loratune_trainer_seconds_total)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._since = time.monotonic()
        self._totals = {"busy": 0.0, "idle": 0.0}

    def set_busy(self, busy: bool) -> None:
        """The trainer starts or stops running a job."""
        with self._lock:
            self._close(time.monotonic())
            self._busy = busy

    def totals(self) -> dict[str, float]:
        """Seconds by state, up to now."""
        with self._lock:
            self._close(time.monotonic())
            return dict(self._totals)

    def _close(self, now: float) -> None:
        self._totals["busy" if self._busy else "idle"] += now - self._since
        self._since = now


class _ClockCollector(Collector):
    def __init__(self, clock: TrainerClock) -> None:
        self._clock = clock

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = self._family()
        for state, seconds in self._clock.totals().items():
            family.add_metric([state], seconds)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "loratune_trainer_seconds",
            "Seconds this trainer was busy (running a job) or idle, by state.",
            labels=["state"],
        )


CLOCK = TrainerClock()
REGISTRY.register(_ClockCollector(CLOCK))
