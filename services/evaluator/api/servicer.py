"""The thin gRPC servicer of EvaluatorService: convert, await the core, convert back."""

from __future__ import annotations

import grpc

from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.evaluator.api.convert import input_from_proto, response_to_proto
from services.evaluator.core.evaluation import Evaluator


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Serves `loratune.evaluator.v1.EvaluatorService`; errors are mapped by the interceptor."""

    def __init__(self, evaluator: Evaluator) -> None:
        self._evaluator = evaluator

    async def Evaluate(
        self,
        request: evaluator_pb2.EvaluateRequest,
        context: grpc.aio.ServicerContext[
            evaluator_pb2.EvaluateRequest, evaluator_pb2.EvaluateResponse
        ],
    ) -> evaluator_pb2.EvaluateResponse:
        """Evaluates predictions against references."""
        evaluation = await self._evaluator.evaluate(
            input_from_proto(request), deadline_seconds=context.time_remaining()
        )
        return response_to_proto(evaluation)
