"""Settings every test shares: no hub, and one torch thread per process.

Tests start several servers (and sometimes processes) on a 2-core machine; a second
OpenMP thread per process made training steps several times slower, not faster.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest


@pytest.fixture(autouse=True, scope="session")
def _float32_unless_a_test_asks() -> Iterator[None]:
    """In-process training computes in float32 on every CPU unless a test asks for bfloat16.

    `LoopOptions.cpu_bf16` defaults to autocast where the CPU has native bfloat16
    (AVX512-BF16, AMX), and CI machines differ in that; tests that check float32 numerics
    (gradient accumulation equals one big batch, a reloaded adapter gives the same logits)
    would then pass on one CPU and fail on another. So the detection answers "no" here;
    tests/unit/trainer/test_cpu_bf16.py forces bfloat16 on, and tests the detection itself.
    Processes a test starts detect for themselves.
    """
    with pytest.MonkeyPatch.context() as patch:
        # Session-wide, so that session-scoped fixtures that train see it too.
        patch.setattr("services.trainer.core.models._native_bf16", False)
        yield
