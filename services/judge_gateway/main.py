"""The judge gateway's composition root: settings -> registry, providers, cache -> server."""

from __future__ import annotations

import os
from collections.abc import Mapping

from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from services.common.config import CommonSettings
from services.common.logging import register_secret
from services.common.server import ServiceDefinition, run
from services.judge_gateway.api.servicer import JudgeGatewayServicer
from services.judge_gateway.config import JudgeSettings
from services.judge_gateway.core.cache import JudgmentCache
from services.judge_gateway.core.gateway import GatewayOptions, JudgeGateway, ProviderFactory
from services.judge_gateway.core.providers.factory import build_provider
from services.judge_gateway.core.registry import JudgeRegistry
from services.judge_gateway.core.resilience import RetryPolicy

SERVICE_NAME = judge_pb2.DESCRIPTOR.services_by_name["JudgeGatewayService"].full_name


def build_gateway(
    settings: JudgeSettings,
    environ: Mapping[str, str] | None = None,
    provider_factory: ProviderFactory = build_provider,
) -> JudgeGateway:
    """The gateway core: registry and secrets from `environ` (read once), cache, limits."""
    registry = JudgeRegistry.from_environment(
        os.environ if environ is None else environ, settings.models, settings.default
    )
    for secret in registry.secrets():
        register_secret(secret)
    return JudgeGateway(
        registry,
        provider_factory,
        JudgmentCache(settings.cache_entries, settings.cache_path),
        GatewayOptions(
            retry=RetryPolicy(
                max_attempts=settings.max_attempts,
                base_delay=settings.retry_base_delay_seconds,
                budget_seconds=settings.retry_budget_seconds,
            ),
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown_seconds,
            max_concurrency=settings.max_concurrency,
            attempt_timeout=settings.attempt_timeout_seconds,
        ),
    )


def service_definition(gateway: JudgeGateway) -> ServiceDefinition:
    """The gateway as a service the common bootstrap serves; closes its clients on stop."""
    servicer = JudgeGatewayServicer(gateway)
    return ServiceDefinition(
        full_name=SERVICE_NAME,
        register=lambda server: judge_pb2_grpc.add_JudgeGatewayServiceServicer_to_server(
            servicer, server
        ),
        on_stop=gateway.aclose,
    )


def main(port: int, metrics_port: int | None) -> int:
    """Serves the judge gateway until SIGTERM / SIGINT; returns the exit code."""
    common = CommonSettings()
    settings = JudgeSettings()
    return run(
        lambda: [service_definition(build_gateway(settings))],
        common,
        port=port,
        metrics_port=metrics_port,
    )
