"""The gateway core over the real Gemini provider and a fake Gemini API: a batch at the cap."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.judge_gateway.core.cache import JudgmentCache
from services.judge_gateway.core.gateway import GatewayOptions, Item, JudgeGateway
from services.judge_gateway.core.providers.factory import build_provider
from services.judge_gateway.core.registry import JudgeRegistry
from tests.fakes.gemini import FakeGemini

LATENCY = 0.25


@pytest.mark.parametrize("cap", [16, 32])
async def test_a_batch_keeps_the_cap_in_flight_over_one_pool_of_connections(
    tmp_path: Path, cap: int
) -> None:
    config = tmp_path / "judges.yaml"
    config.write_text(
        "models:\n  - id: wide\n    provider: gemini\n    model: gemini-2.5-flash\n"
        f"    max_concurrency: {cap}\n"
    )
    with FakeGemini(latency=LATENCY) as fake:
        env = {"GEMINI_API_KEY": fake.api_key, "GOOGLE_GEMINI_BASE_URL": fake.url}
        gateway = JudgeGateway(
            JudgeRegistry.from_environment(env, config),
            build_provider,
            JudgmentCache(),
            GatewayOptions(max_concurrency=cap),
        )
        try:
            # A long-lived gateway has built its client (and its TLS contexts) already.
            await gateway.score("wide", [Item("p", "warm", "r")])
            started = time.monotonic()
            items = [Item("p", f"c{i}", "r") for i in range(3 * cap)]
            batch = await gateway.score("wide", items)
            elapsed = time.monotonic() - started
        finally:
            await gateway.aclose()

        assert batch.judged == 3 * cap
        assert fake.peak_concurrency == cap  # the whole cap in flight, never more
        # One client: its connections (the warm-up's among them) carry all three rounds,
        # none opened per call, also past httpx's default of 20 kept alive.
        assert fake.connections_opened == cap
        # Three rounds, with room for a loaded machine: half the cap would take six,
        # sequential calls 3 * cap.
        assert elapsed < 5 * LATENCY, elapsed
