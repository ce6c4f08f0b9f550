"""The gateway core with an in-process fake provider: retries, breaker, caps, cache, outcomes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from services.common import errors
from services.judge_gateway.core.cache import CacheKey, JudgmentCache
from services.judge_gateway.core.gateway import GatewayOptions, Item, JudgeGateway, Outcome
from services.judge_gateway.core.providers.base import (
    FinishReason,
    ProviderError,
    ProviderErrorKind,
    ProviderReply,
    ProviderRequest,
)
from services.judge_gateway.core.registry import JudgeRegistry
from services.judge_gateway.core.resilience import RetryPolicy

ENV = {"GEMINI_API_KEY": "gm-secret-key", "GIGACHAT_CREDENTIALS": "gc-secret-cred"}
Step = Callable[[ProviderRequest], ProviderReply] | ProviderError | ProviderReply


def ok(score: float = 80.0, text: str | None = None) -> ProviderReply:
    body = text if text is not None else json.dumps({"reasoning": "fine", "score": score})
    return ProviderReply(body, FinishReason.STOP, "fake-model-001", 10, 5)


class FakeProvider:
    """Answers from a script (one step per call), then with `default`; records everything."""

    provider_type = "gemini"
    api_version = "v1beta"

    def __init__(self, latency: float = 0.0) -> None:
        self.script: list[Step] = []
        self.default: Step = ok()
        self.requests: list[ProviderRequest] = []
        self.latency = latency
        self.inflight = 0
        self.peak = 0
        self.closed = False

    async def generate(self, request: ProviderRequest) -> ProviderReply:
        self.requests.append(request)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            step = self.script.pop(0) if self.script else self.default
            if isinstance(step, ProviderError):
                raise step
            if isinstance(step, ProviderReply):
                return step
            return step(request)
        finally:
            self.inflight -= 1

    async def aclose(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make(
    provider: FakeProvider | None = None,
    env: Mapping[str, str] = ENV,
    options: GatewayOptions | None = None,
    cache: JudgmentCache | None = None,
    clock: FakeClock | None = None,
) -> tuple[JudgeGateway, FakeProvider]:
    provider = provider or FakeProvider()
    clock = clock or FakeClock()
    gateway = JudgeGateway(
        JudgeRegistry.from_environment(env),
        lambda kind, opts: provider,
        cache if cache is not None else JudgmentCache(),
        options or GatewayOptions(retry=RetryPolicy(base_delay=0.5, budget_seconds=60)),
        clock=clock,
        sleep=clock.sleep,
    )
    return gateway, provider


ITEM = Item("What is the limit?", "The limit is 500 EUR.", "Daily limit: 500 EUR.")


def by_candidate(replies: dict[str, ProviderReply]) -> Callable[[ProviderRequest], ProviderReply]:
    """A responder keyed on the candidate text inside the prompt (items run concurrently)."""

    def respond(request: ProviderRequest) -> ProviderReply:
        for candidate, reply in replies.items():
            if f"<<<BEGIN CANDIDATE>>>\n{candidate}\n" in request.user_prompt:
                return reply
        return ok()

    return respond


async def test_scores_and_mean_over_judged_items() -> None:
    gateway, provider = make()
    provider.default = by_candidate({"c0": ok(90), "c1": ok(text="garbage"), "c2": ok(70)})
    items = [Item("p", f"c{i}", "r") for i in range(3)]
    batch = await gateway.score("gemini", items)
    outcomes = sorted(r.outcome.value for r in batch.results)
    assert outcomes == ["ok", "ok", "parse_failed"]
    assert batch.judged == 2 and batch.mean_score == pytest.approx(80.0)
    failed = next(r for r in batch.results if r.outcome is Outcome.PARSE_FAILED)
    assert failed.score is None  # never recorded as 0


async def test_unreadable_reply_is_asked_again_once() -> None:
    gateway, provider = make()
    empty = ProviderReply("", FinishReason.MAX_TOKENS, "m", 10, 1024)
    provider.script = [empty, ok(66)]
    batch = await gateway.score("gemini", [ITEM])
    assert batch.results[0].score == 66 and len(provider.requests) == 2
    assert provider.requests[1].user_prompt.endswith("and nothing else.")


async def test_temperature_zero_and_schema_sent() -> None:
    gateway, provider = make()
    await gateway.score("", [ITEM])
    request = provider.requests[0]
    assert request.temperature == 0.0 and request.model == "gemini-2.5-flash"
    assert request.response_schema["required"] == ["reasoning", "score"]


async def test_retry_after_is_honoured_and_retries_stop_at_success() -> None:
    clock = FakeClock()
    gateway, provider = make(clock=clock)
    provider.script = [
        ProviderError(ProviderErrorKind.RATE_LIMITED, "slow down", status=429, retry_after=7),
        ProviderError(ProviderErrorKind.SERVER, "oops", status=500),
        ok(75),
    ]
    batch = await gateway.score("gemini", [ITEM])
    assert batch.results[0].score == 75
    assert len(clock.sleeps) == 2
    assert 7.0 <= clock.sleeps[0] <= 7.2
    assert 0.25 <= clock.sleeps[1] <= 1.0  # backoff of attempt 2, jittered


async def test_backoff_grows_exponentially() -> None:
    clock = FakeClock()
    gateway, provider = make(
        clock=clock,
        options=GatewayOptions(
            retry=RetryPolicy(max_attempts=5, base_delay=1.0, budget_seconds=1000)
        ),
    )
    provider.script = [ProviderError(ProviderErrorKind.TRANSPORT, "reset")] * 4 + [ok()]
    await gateway.score("gemini", [ITEM])
    for i, delay in enumerate(clock.sleeps):
        assert 2**i / 2 <= delay <= 2**i


@pytest.mark.parametrize(
    ("kind", "status_error"),
    [
        (ProviderErrorKind.BAD_REQUEST, errors.FailedPrecondition),
        (ProviderErrorKind.PERMISSION_DENIED, errors.PermissionDenied),
        (ProviderErrorKind.MODEL_NOT_FOUND, errors.FailedPrecondition),
        (ProviderErrorKind.QUOTA_EXHAUSTED, errors.ResourceExhausted),
        (ProviderErrorKind.UNAUTHENTICATED, errors.Unauthenticated),
    ],
)
async def test_no_retry_on_final_errors(
    kind: ProviderErrorKind, status_error: type[errors.LoratuneError]
) -> None:
    clock = FakeClock()
    gateway, provider = make(clock=clock)
    provider.default = ProviderError(kind, "no")
    with pytest.raises(status_error) as caught:
        await gateway.score("gemini", [ITEM])
    assert len(provider.requests) == 1 and clock.sleeps == []
    assert "could not judge any of 1 items" in str(caught.value)
    if kind is ProviderErrorKind.MODEL_NOT_FOUND:
        assert "configuration error" in str(caught.value)


async def test_rate_limit_after_retries_is_resource_exhausted_and_budget_bounds_it() -> None:
    clock = FakeClock()
    gateway, provider = make(clock=clock)
    provider.default = ProviderError(ProviderErrorKind.RATE_LIMITED, "429", retry_after=20)
    with pytest.raises(errors.ResourceExhausted):
        await gateway.score("gemini", [ITEM])
    assert sum(clock.sleeps) < 60 and len(provider.requests) == 3


async def test_partial_failure_is_ok_with_outcomes() -> None:
    gateway, provider = make()
    provider.script = [ok(90), ProviderError(ProviderErrorKind.BAD_REQUEST, "bad")]
    batch = await gateway.score("gemini", [Item("p", "a", "r"), Item("p", "b", "r")])
    assert {r.outcome for r in batch.results} == {Outcome.OK, Outcome.ERROR}
    assert batch.mean_score == 90.0


async def test_circuit_opens_fails_fast_then_probes() -> None:
    clock = FakeClock()
    options = GatewayOptions(
        retry=RetryPolicy(max_attempts=1), breaker_threshold=3, breaker_cooldown=30
    )
    gateway, provider = make(clock=clock, options=options)
    provider.default = ProviderError(ProviderErrorKind.SERVER, "down", status=503)
    for i in range(3):
        with pytest.raises(errors.Unavailable):
            await gateway.score("gemini", [Item("p", f"c{i}", "r")])
    calls = len(provider.requests)
    with pytest.raises(errors.Unavailable, match="circuit open"):
        await gateway.score("gemini", [Item("p", "fast", "r")])
    assert len(provider.requests) == calls  # failed fast, provider untouched
    clock.now += 31
    provider.default = ok(60)
    batch = await gateway.score("gemini", [Item("p", "probe", "r")])
    assert batch.results[0].score == 60 and len(provider.requests) == calls + 1


async def test_concurrency_cap_per_provider() -> None:
    provider = FakeProvider(latency=0.02)
    gateway = JudgeGateway(
        JudgeRegistry.from_environment(ENV),
        lambda kind, opts: provider,
        JudgmentCache(),
        GatewayOptions(max_concurrency=16),
    )
    items = [Item("p", f"c{i}", "r") for i in range(30)]
    await gateway.score("gigachat", items)
    assert provider.peak == 2  # GigaChat's default cap
    provider.peak = 0
    await gateway.score("gemini", [Item("p", f"g{i}", "r") for i in range(30)])
    assert provider.peak == 8


async def test_cache_hit_on_repeat_and_miss_when_a_setting_changes(tmp_path: Path) -> None:
    gateway, provider = make()
    await gateway.score("gemini", [ITEM])
    batch = await gateway.score("gemini", [ITEM])
    assert batch.results[0].cached and len(provider.requests) == 1
    await gateway.score("gemini", [ITEM], rubric="Be strict.")
    assert len(provider.requests) == 2
    await gateway.score("gemini", [Item(ITEM.prompt, ITEM.candidate + " ", ITEM.reference)])
    assert len(provider.requests) == 3
    other_model, provider2 = make(
        env={**ENV, "GEMINI_MODEL": "gemini-2.5-pro"}, cache=gateway._cache
    )
    await other_model.score("gemini", [ITEM])
    assert len(provider2.requests) == 1


async def test_failures_are_never_cached() -> None:
    gateway, provider = make()
    provider.default = by_candidate({"x": ok(text="bad")})
    first = await gateway.score("gemini", [ITEM, Item("p", "x", "r")])
    assert {r.outcome for r in first.results} == {Outcome.OK, Outcome.PARSE_FAILED}
    provider.default = ok()
    again = await gateway.score("gemini", [ITEM, Item("p", "x", "r")])
    assert all(r.outcome is Outcome.OK for r in again.results)


async def test_sqlite_cache_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "judge-cache.sqlite"
    gateway, _ = make(cache=JudgmentCache(path=path))
    await gateway.score("gemini", [ITEM])
    await gateway.aclose()
    restarted, provider2 = make(cache=JudgmentCache(path=path))
    batch = await restarted.score("gemini", [ITEM])
    assert batch.results[0].cached and provider2.requests == []
    assert "gm-secret-key" not in path.read_bytes().decode("utf-8", "replace")


async def test_deadline_bounds_the_retries() -> None:
    clock = FakeClock()
    gateway, provider = make(clock=clock)
    provider.default = ProviderError(ProviderErrorKind.SERVER, "down")
    with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
        await gateway.score("gemini", [ITEM], deadline=clock.now + 2.0)
    assert clock.now <= 1002.0


async def test_empty_items_is_invalid() -> None:
    gateway, _ = make()
    with pytest.raises(errors.InvalidArgument, match="items"):
        await gateway.score("gemini", [])


async def test_empty_candidate_is_scored_zero_without_the_provider_and_never_cached() -> None:
    gateway, provider = make()
    provider.default = ok(90)
    items = [ITEM, Item("p", "", "r"), Item("p", " \n\t ", "r")]
    batch = await gateway.score("gemini", items)
    assert len(provider.requests) == 1
    assert "<<<BEGIN CANDIDATE>>>\nThe limit is 500 EUR.\n" in provider.requests[0].user_prompt
    real, empty, blank = batch.results
    assert real.score == 90 and not real.cached
    for result in (empty, blank):
        assert result.outcome is Outcome.OK and result.score == 0.0 and not result.cached
        assert result.reasoning == "empty candidate: scored 0 without calling the judge"
    assert batch.judged == 3 and batch.mean_score == pytest.approx(30.0)
    again = await gateway.score("gemini", items)
    assert [r.cached for r in again.results] == [True, False, False]
    assert len(provider.requests) == 1


async def test_a_batch_of_only_empty_candidates_is_judged_without_any_call() -> None:
    gateway, provider = make()
    batch = await gateway.score("gemini", [Item("p", "", "r")])
    assert batch.judged == 1 and batch.mean_score == 0.0 and provider.requests == []


async def test_a_provider_overrunning_its_timeout_is_cut_by_the_backup_timeout() -> None:
    provider = FakeProvider(latency=30.0)  # ignores the attempt's timeout it is given
    gateway = JudgeGateway(
        JudgeRegistry.from_environment(ENV),
        lambda kind, opts: provider,
        JudgmentCache(),
        GatewayOptions(retry=RetryPolicy(max_attempts=1), attempt_timeout=0.05),
    )
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        await gateway.score("gemini", [ITEM])
    assert time.monotonic() - started < 5.0  # 0.05 s + the 1 s backup, not 30 s
    assert provider.inflight == 0  # cancelled, not left running


def test_cache_key_digest_is_stable() -> None:
    # Persisted caches are keyed by it: the same fields must keep the same digest.
    key = CacheKey(
        provider_type="gemini",
        model_name="gemini-2.5-flash",
        api_version="v1beta",
        rubric_version="rubric-v1",
        prompt_version="prompt-v1",
        schema_version="schema-v1",
        prompt=ITEM.prompt,
        candidate=ITEM.candidate,
        reference=ITEM.reference,
        temperature=0.0,
        max_output_tokens=1024,
    )
    assert key.digest() == "031bef338668e4cc0febd5d2ae5e2ee4a758f3f9df780fe1e1618e7d85ed4d2a"
    assert key == replace(key) and "digest" not in repr(key)
