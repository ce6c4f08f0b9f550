"""The judge gateway's core: judge items concurrently, within limits, through the cache."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.common import errors
from services.judge_gateway import metrics
from services.judge_gateway.core.cache import CachedJudgment, CacheKey, JudgmentCache
from services.judge_gateway.core.parsing import Judgment, parse_judgment
from services.judge_gateway.core.providers.base import (
    JudgeProvider,
    ProviderError,
    ProviderErrorKind,
    ProviderReply,
    ProviderRequest,
)
from services.judge_gateway.core.registry import (
    DEFAULT_CONCURRENCY,
    JudgeRegistry,
    ResolvedModel,
)
from services.judge_gateway.core.resilience import CircuitBreaker, CircuitOpenError, RetryPolicy
from services.judge_gateway.core.rubric import (
    PROMPT_VERSION,
    REASK_SUFFIX,
    RESPONSE_SCHEMA,
    SCHEMA_VERSION,
    build_prompt,
    rubric_version,
)

logger = logging.getLogger(__name__)

ProviderFactory = Callable[[str, Mapping[str, str]], JudgeProvider]

# An empty generation is the model's answer, and worth nothing: judged 0 on the spot.
EMPTY_CANDIDATE_REASONING = "empty candidate: scored 0 without calling the judge"


class Outcome(enum.Enum):
    """What happened to one item (the proto's JudgeOutcome)."""

    OK = "ok"
    PARSE_FAILED = "parse_failed"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class Item:
    """One item to judge."""

    prompt: str
    candidate: str
    reference: str


@dataclass(frozen=True)
class ItemResult:
    """The judgment of one item, or why there is none."""

    outcome: Outcome
    score: float | None = None
    reasoning: str = ""
    cached: bool = False
    error: str = ""
    provider_model: str = ""
    # Why it failed, for choosing the status when no item at all was judged.
    failure: ProviderErrorKind | str | None = None


@dataclass(frozen=True)
class ScoreBatch:
    """The judgments of a batch."""

    results: tuple[ItemResult, ...]
    provider_model: str
    rubric_version: str

    @property
    def judged(self) -> int:
        """Items with a valid score."""
        return sum(1 for r in self.results if r.score is not None)

    @property
    def mean_score(self) -> float:
        """Mean over the judged items only (0 when none)."""
        scores = [r.score for r in self.results if r.score is not None]
        return sum(scores) / len(scores) if scores else 0.0


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry as ListJudgeModels shows it."""

    id: str
    provider: str
    model_name: str
    available: bool
    is_default: bool
    missing: tuple[str, ...]


@dataclass(frozen=True)
class GatewayOptions:
    """Limits and resilience settings."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0
    max_concurrency: int = 16
    attempt_timeout: float = 30.0
    # Kept back from the caller's deadline so the answer still arrives in time.
    deadline_margin: float = 0.2


class _Series:
    """One judge model's metric series, looked up once: `labels()` costs a locked lookup,
    and an item would pay for several of them."""

    def __init__(self, model_id: str) -> None:
        self.request_duration = metrics.REQUEST_DURATION.labels(judge_model_id=model_id)
        self.provider_latency = metrics.PROVIDER_LATENCY.labels(judge_model_id=model_id)
        self.input_tokens = metrics.TOKENS.labels(judge_model_id=model_id, type="input")
        self.output_tokens = metrics.TOKENS.labels(judge_model_id=model_id, type="output")
        self.requests = {
            outcome: metrics.REQUESTS.labels(judge_model_id=model_id, outcome=outcome.value)
            for outcome in Outcome
        }


class _Slot:
    """One provider client with its breaker and concurrency cap, shared by its models."""

    def __init__(self, provider: JudgeProvider, breaker: CircuitBreaker, cap: int) -> None:
        self.provider = provider
        self.breaker = breaker
        self.semaphore = asyncio.Semaphore(cap)
        self.model_ids: set[str] = set()


_FAILURE_PRIORITY: tuple[tuple[ProviderErrorKind | str, type[errors.LoratuneError]], ...] = (
    (ProviderErrorKind.MODEL_NOT_FOUND, errors.FailedPrecondition),
    (ProviderErrorKind.UNAUTHENTICATED, errors.Unauthenticated),
    (ProviderErrorKind.PERMISSION_DENIED, errors.PermissionDenied),
    (ProviderErrorKind.BAD_REQUEST, errors.FailedPrecondition),
    (ProviderErrorKind.QUOTA_EXHAUSTED, errors.ResourceExhausted),
    (ProviderErrorKind.RATE_LIMITED, errors.ResourceExhausted),
    (ProviderErrorKind.TIMEOUT, errors.DeadlineExceeded),
    ("deadline", errors.DeadlineExceeded),
    ("circuit", errors.Unavailable),
    (ProviderErrorKind.SERVER, errors.Unavailable),
    (ProviderErrorKind.TRANSPORT, errors.Unavailable),
    ("parse", errors.Unavailable),
)

_OUTCOME_OF_KIND = {
    ProviderErrorKind.RATE_LIMITED: Outcome.RATE_LIMITED,
    ProviderErrorKind.QUOTA_EXHAUSTED: Outcome.RATE_LIMITED,
    ProviderErrorKind.TIMEOUT: Outcome.TIMEOUT,
}

# Failures that say the provider is unwell; the others say nothing of its health.
_BREAKER_FAILURES = frozenset(
    {ProviderErrorKind.SERVER, ProviderErrorKind.TRANSPORT, ProviderErrorKind.TIMEOUT}
)


class JudgeGateway:
    """Judges items with the registry's models: cache, caps, breaker, retries, parsing."""

    def __init__(
        self,
        registry: JudgeRegistry,
        provider_factory: ProviderFactory,
        cache: JudgmentCache,
        options: GatewayOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self._factory = provider_factory
        self._cache = cache
        self._options = options or GatewayOptions()
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._slots: dict[tuple[str, ...], _Slot] = {}
        self._series: dict[str, _Series] = {}
        self._overall: asyncio.Semaphore | None = None
        # Every registered model's series exist from the start (at 0): rates, ratios and
        # the circuit alert work before the first item is judged.
        metrics.declare_models(
            [m.spec.id for m in registry.models()],
            [o.value for o in Outcome],
            [k.value for k in ProviderErrorKind if k.retryable],
        )

    def list_models(self) -> list[ModelInfo]:
        """Every registered model and whether it has its credentials."""
        return [
            ModelInfo(
                id=m.spec.id,
                provider=m.spec.provider_type,
                model_name=m.spec.model_name,
                available=m.available,
                is_default=m.spec.id == self.registry.default_id,
                missing=m.missing,
            )
            for m in self.registry.models()
        ]

    def _slot(self, model: ResolvedModel) -> _Slot:
        key = model.spec.connection_key
        slot = self._slots.get(key)
        if slot is None:
            provider = self._factory(model.spec.provider_type, model.provider_options())
            cap = model.spec.max_concurrency or DEFAULT_CONCURRENCY[model.spec.provider_type]
            slot_ids: set[str] = set()

            def on_change(is_open: bool) -> None:
                for model_id in slot_ids:
                    metrics.CIRCUIT_OPEN.labels(judge_model_id=model_id).set(int(is_open))
                logger.warning(
                    "circuit of provider %s %s",
                    model.spec.provider_type,
                    "opened" if is_open else "closed",
                )

            breaker = CircuitBreaker(
                self._options.breaker_threshold,
                self._options.breaker_cooldown,
                clock=self._clock,
                on_change=on_change,
            )
            slot = _Slot(provider, breaker, cap)
            slot.model_ids = slot_ids
            self._slots[key] = slot
        slot.model_ids.add(model.spec.id)
        return slot

    async def score(
        self,
        model_id: str,
        items: Sequence[Item],
        rubric: str = "",
        deadline: float | None = None,
    ) -> ScoreBatch:
        """Judges `items` concurrently; `deadline` is an absolute time on the gateway's clock.

        Partial failure returns per-item outcomes; only when no item could be judged does
        it raise, with the error that explains why.
        """
        if not items:
            raise errors.InvalidArgument("must hold at least one item", field="items")
        model = self.registry.resolve(model_id)
        if self._overall is None:
            self._overall = asyncio.Semaphore(self._options.max_concurrency)
        slot = self._slot(model)
        series = self._series.get(model.spec.id)
        if series is None:
            series = self._series[model.spec.id] = _Series(model.spec.id)
        version = rubric_version(rubric)
        jobs = [
            self._judge_item(model, slot, series, item, rubric, version, deadline) for item in items
        ]
        # One item (an evaluator's single call) needs no task of its own.
        results = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        provider_model = next(
            (r.provider_model for r in results if r.provider_model), model.spec.model_name
        )
        batch = ScoreBatch(tuple(results), provider_model, version)
        logger.info(
            "judged %d/%d items with %s (%s): mean %.2f, %d cached",
            batch.judged,
            len(items),
            model.spec.id,
            provider_model,
            batch.mean_score,
            sum(1 for r in results if r.cached),
        )
        if batch.judged == 0:
            raise self._batch_error(model, batch)
        return batch

    def _batch_error(self, model: ResolvedModel, batch: ScoreBatch) -> errors.LoratuneError:
        failures = {r.failure: r for r in batch.results if r.failure is not None}
        for failure, error_type in _FAILURE_PRIORITY:
            if failure in failures:
                detail = failures[failure].error
                if failure is ProviderErrorKind.MODEL_NOT_FOUND:
                    detail = (
                        f"the provider has no model '{model.spec.model_name}' "
                        f"(a configuration error): {detail}"
                    )
                return error_type(
                    f"judge model '{model.spec.id}' could not judge any of "
                    f"{len(batch.results)} items: {detail}"
                )
        return errors.Unavailable(f"judge model '{model.spec.id}' could not judge any item")

    def _cache_key(self, model: ResolvedModel, slot: _Slot, item: Item, version: str) -> CacheKey:
        return CacheKey(
            provider_type=model.spec.provider_type,
            model_name=model.spec.model_name,
            api_version=slot.provider.api_version,
            rubric_version=version,
            prompt_version=PROMPT_VERSION,
            schema_version=SCHEMA_VERSION,
            prompt=item.prompt,
            candidate=item.candidate,
            reference=item.reference,
            temperature=model.spec.temperature,
            max_output_tokens=model.spec.max_output_tokens,
        )

    async def _judge_item(
        self,
        model: ResolvedModel,
        slot: _Slot,
        series: _Series,
        item: Item,
        rubric: str,
        version: str,
        deadline: float | None,
    ) -> ItemResult:
        started = self._clock()
        try:
            result = await self._judge_uncounted(
                model, slot, series, item, rubric, version, deadline
            )
        finally:
            series.request_duration.observe(self._clock() - started)
        series.requests[result.outcome].inc()
        return result

    async def _judge_uncounted(
        self,
        model: ResolvedModel,
        slot: _Slot,
        series: _Series,
        item: Item,
        rubric: str,
        version: str,
        deadline: float | None,
    ) -> ItemResult:
        if not item.candidate.strip():
            # Nothing for a judge to read: no provider call, and nothing worth caching.
            return ItemResult(Outcome.OK, 0.0, EMPTY_CANDIDATE_REASONING)
        key = self._cache_key(model, slot, item, version)
        hit = self._cache.get(key)
        if hit is not None:
            metrics.CACHE_HITS.inc()
            return ItemResult(
                Outcome.OK, hit.score, hit.reasoning, cached=True, provider_model=hit.provider_model
            )
        metrics.CACHE_MISSES.inc()

        prompt = build_prompt(item.prompt, item.candidate, item.reference, rubric)
        request = ProviderRequest(
            model=model.spec.model_name,
            system_instruction=prompt.system_instruction,
            user_prompt=prompt.user_prompt,
            response_schema=RESPONSE_SCHEMA,
            temperature=model.spec.temperature,
            max_output_tokens=model.spec.max_output_tokens,
            timeout=self._options.attempt_timeout,
        )
        reply: ProviderReply | None = None
        try:
            judgment: Judgment | None = None
            for ask in range(2):  # a reply that cannot be read is asked again once
                if ask:
                    request = replace(request, user_prompt=request.user_prompt + REASK_SUFFIX)
                reply = await self._call(model.spec.id, slot, series, request, deadline)
                judgment = parse_judgment(reply.text)
                if judgment is not None:
                    break
                logger.info(
                    "judge %s reply unreadable (finish %s, %d chars)%s",
                    model.spec.id,
                    reply.finish_reason.value,
                    len(reply.text),
                    "; asking again" if not ask else "",
                )
        except ProviderError as err:
            return ItemResult(
                _OUTCOME_OF_KIND.get(err.kind, Outcome.ERROR),
                error=f"{err.kind.value}: {err.message}",
                failure=err.kind,
            )
        except CircuitOpenError as err:
            return ItemResult(
                Outcome.ERROR, error=f"provider unavailable ({err})", failure="circuit"
            )
        except TimeoutError:
            return ItemResult(
                Outcome.TIMEOUT, error="no time left before the deadline", failure="deadline"
            )
        assert reply is not None
        if judgment is None:
            return ItemResult(
                Outcome.PARSE_FAILED,
                error="the judge's reply could not be parsed, twice",
                provider_model=reply.model_version,
                failure="parse",
            )
        self._cache.put(
            key, CachedJudgment(judgment.score, judgment.reasoning, reply.model_version)
        )
        return ItemResult(
            Outcome.OK, judgment.score, judgment.reasoning, provider_model=reply.model_version
        )

    async def _call(
        self,
        model_id: str,
        slot: _Slot,
        series: _Series,
        request: ProviderRequest,
        deadline: float | None,
    ) -> ProviderReply:
        """One logical call: attempts with backoff until success, a final error or the budget."""
        policy = self._options.retry
        end = self._clock() + policy.budget_seconds
        if deadline is not None:
            end = min(end, deadline - self._options.deadline_margin)
        assert self._overall is not None
        attempt = 0
        while True:
            attempt += 1
            remaining = end - self._clock()
            if remaining <= 0:
                raise TimeoutError
            slot.breaker.before_call()
            async with self._overall, slot.semaphore:
                timeout = min(self._options.attempt_timeout, end - self._clock())
                if timeout <= 0:
                    slot.breaker.record_neutral()
                    raise TimeoutError
                metrics.INFLIGHT.inc()
                started = self._clock()
                try:
                    # The provider enforces `timeout` itself; this only backs it up. (A
                    # timeout scope, unlike wait_for, runs the call in this task: no task
                    # to create and schedule per call.)
                    async with asyncio.timeout(timeout + 1.0):
                        reply = await slot.provider.generate(replace(request, timeout=timeout))
                except TimeoutError:
                    error: ProviderError | None = ProviderError(
                        ProviderErrorKind.TIMEOUT, f"no reply within {timeout:.1f} s"
                    )
                except ProviderError as err:
                    error = err
                else:
                    error = None
                finally:
                    metrics.INFLIGHT.dec()
                    series.provider_latency.observe(self._clock() - started)
            if error is None:
                slot.breaker.record_success()
                series.input_tokens.inc(reply.input_tokens)
                series.output_tokens.inc(reply.output_tokens)
                return reply
            if error.kind in _BREAKER_FAILURES:
                slot.breaker.record_failure()
            else:
                slot.breaker.record_neutral()
            if not error.kind.retryable or attempt >= policy.max_attempts:
                raise error
            delay = policy.delay(attempt, error, self._rng)
            if not math.isfinite(delay) or self._clock() + delay >= end:
                raise error
            metrics.RETRIES.labels(judge_model_id=model_id, reason=error.kind.value).inc()
            logger.info(
                "judge %s: %s (attempt %d), retrying in %.2f s",
                model_id,
                error.kind.value,
                attempt,
                delay,
            )
            await self._sleep(delay)

    async def aclose(self) -> None:
        """Closes every provider client and the cache."""
        for slot in self._slots.values():
            await slot.provider.aclose()
        self._slots.clear()
        self._cache.close()
