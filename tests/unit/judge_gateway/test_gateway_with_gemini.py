"""The gateway core over the real Gemini provider and a fake Gemini API: a batch at the cap."""

from __future__ import annotations

import time
from pathlib import Path

from services.judge_gateway.core.cache import JudgmentCache
from services.judge_gateway.core.gateway import GatewayOptions, Item, JudgeGateway
from services.judge_gateway.core.providers.factory import build_provider
from services.judge_gateway.core.registry import JudgeRegistry
from tests.fakes.gemini import FakeGemini

LATENCY = 0.2


async def test_a_batch_keeps_the_cap_in_flight_over_one_pool_of_connections(
    tmp_path: Path,
) -> None:
    config = tmp_path / "judges.yaml"
    config.write_text(
        "models:\n  - id: wide\n    provider: gemini\n    model: gemini-2.5-flash\n"
        "    max_concurrency: 16\n"
    )
    with FakeGemini(latency=LATENCY) as fake:
        env = {"GEMINI_API_KEY": fake.api_key, "GOOGLE_GEMINI_BASE_URL": fake.url}
        gateway = JudgeGateway(
            JudgeRegistry.from_environment(env, config),
            build_provider,
            JudgmentCache(),
            GatewayOptions(max_concurrency=16),
        )
        try:
            # A long-lived gateway has built its client (and its TLS contexts) already.
            await gateway.score("wide", [Item("p", "warm", "r")])
            started = time.monotonic()
            batch = await gateway.score("wide", [Item("p", f"c{i}", "r") for i in range(48)])
            elapsed = time.monotonic() - started
        finally:
            await gateway.aclose()

        assert batch.judged == 48
        assert fake.peak_concurrency == 16  # the whole cap in flight, never more
        # One client: its 16 connections (the warm-up's among them) carry all three
        # rounds, none opened per call.
        assert fake.connections_opened == 16
        # Three rounds one after another; per-call work in the gateway must not add a
        # fourth (sequential calls would take 48 rounds, a cap of 8 six).
        assert elapsed < 3 * LATENCY + 0.5
