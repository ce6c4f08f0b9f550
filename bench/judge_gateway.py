"""Benchmark: the judge gateway vs sequential SDK calls, and the gateway's own overhead.

1. Throughput: 200 items against a fake Gemini with 100 ms latency, judged through the
   gateway (concurrency 16, one ScoreResponses call) against the same 200 items sent
   one after another with the google-genai SDK, as a user's script would. Ratio printed.
2. Overhead: single-item ScoreResponses calls (cache misses) against a 0 ms fake,
   against direct SDK calls to the same fake: p50 / p99 of each and the difference.
3. A cache hit: single-item calls whose judgment is cached.

    .venv/bin/python bench/judge_gateway.py [--items 200] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from google import genai  # noqa: E402
from google.genai import types  # noqa: E402

from loratune.judge.v1 import judge_pb2, judge_pb2_grpc  # noqa: E402
from services.common.config import CommonSettings  # noqa: E402
from services.common.server import start_server  # noqa: E402
from services.judge_gateway.config import JudgeSettings  # noqa: E402
from services.judge_gateway.core.providers.base import (  # noqa: E402
    JudgeProvider,
    ProviderReply,
    ProviderRequest,
)
from services.judge_gateway.core.providers.factory import build_provider  # noqa: E402
from services.judge_gateway.core.rubric import RESPONSE_SCHEMA, build_prompt  # noqa: E402
from services.judge_gateway.main import build_gateway, service_definition  # noqa: E402
from tests.fakes.gemini import FakeGemini  # noqa: E402

KEY = "bench-key"
MODEL = "gemini-2.5-flash"


def items(n: int, tag: str) -> list[judge_pb2.JudgeItem]:
    return [
        judge_pb2.JudgeItem(
            prompt=f"How do I top up my card? ({tag} {i})",
            candidate=f"Use a bank transfer or a card payment. ({i})",
            reference="You can top up by bank transfer or with a debit card.",
        )
        for i in range(n)
    ]


def sequential_sdk(fake: FakeGemini, batch: list[judge_pb2.JudgeItem]) -> list[float]:
    """The alternative: one SDK call after another; returns each call's seconds."""
    client = genai.Client(
        api_key=KEY, http_options=types.HttpOptions(base_url=fake.url, api_version="v1beta")
    )
    times = []
    for item in batch:
        prompt = build_prompt(item.prompt, item.candidate, item.reference)
        started = time.perf_counter()
        client.models.generate_content(
            model=MODEL,
            contents=prompt.user_prompt,
            config=types.GenerateContentConfig(
                system_instruction=prompt.system_instruction,
                temperature=0.0,
                response_mime_type="application/json",
                response_json_schema=RESPONSE_SCHEMA,
            ),
        )
        times.append(time.perf_counter() - started)
    return times


class TimedProvider:
    """Wraps the real provider to record how long each provider call takes, so that the
    gateway's own overhead is the call's time less the provider's."""

    def __init__(self, inner: JudgeProvider, log: list[float]) -> None:
        self._inner = inner
        self._log = log
        self.provider_type = inner.provider_type
        self.api_version = inner.api_version

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        started = time.perf_counter()
        try:
            return await self._inner.generate(request)
        finally:
            self._log.append(time.perf_counter() - started)

    async def aclose(self) -> None:
        await self._inner.aclose()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "judges.yaml"
        config.write_text(
            f"models:\n  - id: bench\n    provider: gemini\n    model: {MODEL}\n"
            f"    max_concurrency: {args.concurrency}\n"
        )
        with FakeGemini(api_key=KEY, latency=args.latency) as slow, FakeGemini(api_key=KEY) as fast:
            results = {}
            provider_times: list[float] = []
            for name, fake in (("slow", slow), ("fast", fast)):
                gateway = build_gateway(
                    JudgeSettings(models=config, max_concurrency=args.concurrency),
                    {"GEMINI_API_KEY": KEY, "GOOGLE_GEMINI_BASE_URL": fake.url},
                    lambda kind, options: TimedProvider(
                        build_provider(kind, options), provider_times
                    ),
                )
                server = await start_server(
                    [service_definition(gateway)],
                    CommonSettings(),
                    host="127.0.0.1",
                    metrics_port=None,
                )
                results[name] = server
            async with grpc.aio.insecure_channel(results["slow"].address) as channel:
                stub = judge_pb2_grpc.JudgeGatewayServiceStub(channel)
                # A gateway is long-lived: open its connections before timing, as the
                # alternative's client is created before its calls are timed.
                await stub.ScoreResponses(
                    judge_pb2.ScoreResponsesRequest(judge_model_id="bench", items=items(32, "warm"))
                )
                batch = items(args.items, "throughput")
                started = time.perf_counter()
                reply = await stub.ScoreResponses(
                    judge_pb2.ScoreResponsesRequest(judge_model_id="bench", items=batch)
                )
                gateway_seconds = time.perf_counter() - started
                assert reply.judged == args.items, reply.judged
            sdk_seconds = sum(await asyncio.to_thread(sequential_sdk, slow, batch))
            print(f"1. {args.items} items, provider latency {args.latency * 1000:.0f} ms")
            print(
                f"   gateway (concurrency {args.concurrency}): {gateway_seconds:7.2f} s "
                f"(peak {slow.peak_concurrency} in flight)"
            )
            print(f"   sequential SDK calls     : {sdk_seconds:7.2f} s")
            print(f"   throughput ratio         : {sdk_seconds / gateway_seconds:7.1f}x")

            async with grpc.aio.insecure_channel(results["fast"].address) as channel:
                stub = judge_pb2_grpc.JudgeGatewayServiceStub(channel)
                warm = items(20, "warm")
                for item in warm:
                    await stub.ScoreResponses(
                        judge_pb2.ScoreResponsesRequest(judge_model_id="bench", items=[item])
                    )
                miss_times: list[float] = []
                hit_times: list[float] = []
                own: list[float] = []
                for item in items(args.calls, "overhead"):
                    request = judge_pb2.ScoreResponsesRequest(judge_model_id="bench", items=[item])
                    started = time.perf_counter()
                    calls_before = len(provider_times)
                    await stub.ScoreResponses(request)
                    miss_times.append(time.perf_counter() - started)
                    own.append(miss_times[-1] - sum(provider_times[calls_before:]))
                    started = time.perf_counter()
                    hit = await stub.ScoreResponses(request)
                    hit_times.append(time.perf_counter() - started)
                    assert hit.scores[0].cached
            direct = await asyncio.to_thread(sequential_sdk, fast, items(args.calls, "direct"))
            rows = (
                ("gateway call (miss)", miss_times),
                ("direct SDK call", direct),
                ("gateway's own time", own),
                ("cache hit", hit_times),
            )
            print(f"2. 0 ms fake, {args.calls} single-item calls (ms)")
            for label, values in rows:
                print(f"   {label:<20} p50 {pct(values, 50):6.2f}  p99 {pct(values, 99):6.2f}")
            print("   (own time = a call less its provider call: gRPC hop, cache, prompt, limits)")
            for server in results.values():
                await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=300)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
