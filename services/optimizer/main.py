"""The optimizer's composition root: settings -> storage, clients, core -> gRPC server."""

from __future__ import annotations

import asyncio

import optuna

from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, ServiceDefinition, run
from services.optimizer.api.convert import search_space_from_json
from services.optimizer.api.servicer import OptimizerServicer
from services.optimizer.clients import (
    Channels,
    GrpcEvaluator,
    GrpcJudgeCatalog,
    GrpcTrainers,
    StaticTrainers,
)
from services.optimizer.config import OptimizerSettings
from services.optimizer.core.optimizer import Optimizer, OptimizerOptions
from services.optimizer.core.ports import TrainerDiscovery
from services.optimizer.core.projects import ProjectCatalog

SERVICE_NAME = optimizer_pb2.DESCRIPTOR.services_by_name["OptimizerService"].full_name


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage (SQLite on one machine, PostgreSQL in a cluster)."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def discovery_for(settings: OptimizerSettings) -> TrainerDiscovery:
    """The static trainer list, or Kubernetes discovery when none is given."""
    addresses = settings.trainer_addresses()
    if addresses or not settings.k8s_namespace:
        return StaticTrainers(addresses)
    from services.optimizer.kubernetes import KubernetesTrainers

    return KubernetesTrainers(
        settings.k8s_namespace, settings.k8s_label_selector, settings.k8s_trainer_port
    )


def project_catalog(settings: OptimizerSettings) -> ProjectCatalog:
    """The projects of LORATUNE_PROJECTS, read once now so that start-up logs them (or why
    the file did not load: the optimizer then starts with none, and reads it again when it
    changes)."""
    catalog = ProjectCatalog(settings.projects_file(), search_space_from_json)
    catalog.current()
    return catalog


def build_optimizer(
    settings: OptimizerSettings,
    defaults: TrainingDefaults,
    client: ClientSettings | None = None,
) -> tuple[Optimizer, Channels]:
    """The optimizer core over gRPC clients of the trainers, evaluator and judge gateway."""
    channels = Channels(client or ClientSettings.from_env())
    optimizer = Optimizer(
        storage=storage_for(settings.storage()),
        trainers=GrpcTrainers(channels),
        discovery=discovery_for(settings),
        evaluator=GrpcEvaluator(channels, settings.evaluator_address),
        judges=GrpcJudgeCatalog(channels, settings.judge_address)
        if settings.judge_address
        else None,
        defaults=defaults,
        options=OptimizerOptions(
            artifact_root=settings.artifact_root,
            max_trial_failures=settings.max_trial_failures,
            max_trial_attempts=settings.max_trial_attempts,
            max_trial_interruptions=settings.max_trial_interruptions,
            evaluation_retry_seconds=settings.evaluation_retry_seconds,
            poll_seconds=settings.poll_seconds,
            wait_for_trainers=settings.trainers_scale_from_zero
            or (not settings.trainer_addresses() and bool(settings.k8s_namespace)),
        ),
        projects=project_catalog(settings),
    )
    return optimizer, channels


def service_definition(optimizer: Optimizer, channels: Channels) -> ServiceDefinition:
    """The optimizer as a service: resumes unfinished studies once serving."""
    servicer = OptimizerServicer(optimizer)
    pending: set[asyncio.Task[None]] = set()

    def on_start(server: RunningServer) -> None:
        task = asyncio.ensure_future(optimizer.resume_all())
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def on_stop() -> None:
        await optimizer.shutdown()
        await channels.close()

    return ServiceDefinition(
        full_name=SERVICE_NAME,
        register=lambda server: optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server(
            servicer, server
        ),
        on_start=on_start,
        on_stop=on_stop,
    )


def main(port: int, metrics_port: int | None) -> int:
    """Serves the optimizer until SIGTERM / SIGINT; returns the exit code."""
    common = CommonSettings()
    settings = OptimizerSettings()
    defaults = TrainingDefaults()

    def services() -> list[ServiceDefinition]:
        optimizer, channels = build_optimizer(settings, defaults)
        return [service_definition(optimizer, channels)]

    return run(services, common, port=port, metrics_port=metrics_port)
