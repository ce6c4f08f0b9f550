"""The evaluator's port to the judge gateway over gRPC."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from services.common.rpc_errors import error_from_rpc
from services.evaluator.core.models import JudgeBatch, JudgeItem


class GrpcJudgeScorer:
    """Calls `JudgeGatewayService.ScoreResponses`; errors become domain errors."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = judge_pb2_grpc.JudgeGatewayServiceStub(channel)

    async def score(
        self, model_id: str, items: Sequence[JudgeItem], timeout: float | None
    ) -> JudgeBatch:
        """Judges `items`; a score without presence (not judged) becomes None."""
        request = judge_pb2.ScoreResponsesRequest(
            judge_model_id=model_id,
            items=[
                judge_pb2.JudgeItem(prompt=i.prompt, candidate=i.candidate, reference=i.reference)
                for i in items
            ],
        )
        try:
            response = await self._stub.ScoreResponses(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err, "judge gateway") from None
        scores = tuple(
            s.score if s.HasField("score") and s.outcome == judge_pb2.JUDGE_OUTCOME_OK else None
            for s in response.scores
        )
        return JudgeBatch(scores=scores, provider_model=response.provider_model)
