"""A tiny main.py for the process test: a fake evaluator served by services.common.server.run."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import grpc

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.config import CommonSettings
from services.common.server import ServiceDefinition, run

logger = logging.getLogger("serve_fake_evaluator")


class SlowEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Sleeps for the seconds in predictions[0], then answers."""

    async def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> evaluator_pb2.EvaluateResponse:
        await asyncio.sleep(float(request.predictions[0]))
        return evaluator_pb2.EvaluateResponse(result=common_pb2.EvaluationResult(objective=0.5))


def services() -> list[ServiceDefinition]:
    servicer = SlowEvaluator()

    async def release() -> None:
        logger.info("fake evaluator released")

    full_name = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name
    return [
        ServiceDefinition(
            full_name,
            lambda server: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(
                servicer, server
            ),
            release,
        )
    ]


if __name__ == "__main__":
    sys.exit(run(services, CommonSettings(), port=0, metrics_port=None))
