"""Prometheus metrics of the trainer."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
