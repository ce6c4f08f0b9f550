"""The trainer's composition root: settings -> runner, job manager -> gRPC server."""

from __future__ import annotations

import asyncio
import logging

from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import RunningServer, ServiceDefinition, run
from services.common.threads import configure_torch_threads
from services.trainer.api.servicer import TrainerServicer
from services.trainer.config import TrainerSettings
from services.trainer.core.jobs import JobManager
from services.trainer.core.runner import LocalRunner
from services.trainer.core.types import LoopOptions

logger = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


def loop_options(settings: TrainerSettings) -> LoopOptions:
    """The training loop's options this deployment gives every job (the rest: defaults)."""
    return LoopOptions(
        linear_probe=settings.trainer_linear_probe,
        head_only_fraction=settings.trainer_head_only_fraction,
        cpu_bf16={"auto": None, "true": True, "false": False}[settings.trainer_cpu_bf16],
    )


def build_manager(settings: TrainerSettings) -> JobManager:
    """The job manager over a runner that trains on this machine's accelerator (or CPU)."""
    runner = LocalRunner(
        tokenization_cache_entries=settings.trainer_tokenization_cache_entries,
        options=loop_options(settings),
    )
    return JobManager(
        runner,
        jobs_kept=settings.trainer_jobs_kept,
        progress_every_steps=settings.trainer_progress_every_steps,
    )


def service_definition(
    manager: JobManager, settings: TrainerSettings, defaults: TrainingDefaults
) -> ServiceDefinition:
    """The trainer as a service; a broken accelerator turns its health NOT_SERVING."""
    servicer = TrainerServicer(manager, defaults, settings.artifact_root)

    pending: set[asyncio.Task[None]] = set()

    def on_start(server: RunningServer) -> None:
        def unhealthy() -> None:
            # Kubernetes' gRPC probe then restarts the pod, the only cure for a broken CUDA.
            for name in ("", SERVICE_NAME):
                task = asyncio.ensure_future(server.set_serving(name, False))
                pending.add(task)
                task.add_done_callback(pending.discard)

        manager.on_unhealthy = unhealthy

    return ServiceDefinition(
        full_name=SERVICE_NAME,
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(
            servicer, server
        ),
        on_stop=manager.shutdown,
        on_start=on_start,
        on_stopping=lambda budget: manager.shutdown(timeout=budget),
    )


def main(port: int, metrics_port: int | None) -> int:
    """Serves the trainer until SIGTERM / SIGINT; returns the exit code."""
    common = CommonSettings()
    configure_torch_threads(common.torch_threads)
    settings = TrainerSettings()
    defaults = TrainingDefaults()
    return run(
        lambda: [service_definition(build_manager(settings), settings, defaults)],
        common,
        port=port,
        metrics_port=metrics_port,
    )
