"""Settings every test shares: no hub, and one torch thread per process.

Tests start several servers (and sometimes processes) on a 2-core machine; a second
OpenMP thread per process made training steps several times slower, not faster.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
