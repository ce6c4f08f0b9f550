"""The thin gRPC servicer of JudgeGatewayService."""

from __future__ import annotations

import time

import grpc

from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from services.judge_gateway.api.convert import score_call_from_proto
from services.judge_gateway.core.gateway import JudgeGateway, Outcome

_OUTCOMES = {
    Outcome.OK: judge_pb2.JUDGE_OUTCOME_OK,
    Outcome.PARSE_FAILED: judge_pb2.JUDGE_OUTCOME_PARSE_FAILED,
    Outcome.RATE_LIMITED: judge_pb2.JUDGE_OUTCOME_RATE_LIMITED,
    Outcome.TIMEOUT: judge_pb2.JUDGE_OUTCOME_TIMEOUT,
    Outcome.ERROR: judge_pb2.JUDGE_OUTCOME_ERROR,
}


class JudgeGatewayServicer(judge_pb2_grpc.JudgeGatewayServiceServicer):
    """Serves `loratune.judge.v1.JudgeGatewayService`; errors are mapped by the interceptor."""

    def __init__(self, gateway: JudgeGateway) -> None:
        self._gateway = gateway

    async def ListJudgeModels(
        self,
        request: judge_pb2.ListJudgeModelsRequest,
        context: grpc.aio.ServicerContext[
            judge_pb2.ListJudgeModelsRequest, judge_pb2.ListJudgeModelsResponse
        ],
    ) -> judge_pb2.ListJudgeModelsResponse:
        """Lists the registry and which models have credentials."""
        return judge_pb2.ListJudgeModelsResponse(
            models=[
                judge_pb2.JudgeModel(
                    id=m.id,
                    provider=m.provider,
                    model_name=m.model_name,
                    available=m.available,
                    is_default=m.is_default,
                    missing_variables=m.missing,
                )
                for m in self._gateway.list_models()
            ]
        )

    async def ScoreResponses(
        self,
        request: judge_pb2.ScoreResponsesRequest,
        context: grpc.aio.ServicerContext[
            judge_pb2.ScoreResponsesRequest, judge_pb2.ScoreResponsesResponse
        ],
    ) -> judge_pb2.ScoreResponsesResponse:
        """Judges the items concurrently; per-item outcomes, mean over the judged ones."""
        call = score_call_from_proto(request)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        batch = await self._gateway.score(
            call.judge_model_id, call.items, rubric=call.rubric, deadline=deadline
        )
        return judge_pb2.ScoreResponsesResponse(
            scores=[
                judge_pb2.JudgeScore(
                    score=r.score,
                    reasoning=r.reasoning,
                    outcome=_OUTCOMES[r.outcome],
                    cached=r.cached,
                    error_message=r.error,
                )
                for r in batch.results
            ],
            mean_score=batch.mean_score,
            judged=batch.judged,
            provider_model=batch.provider_model,
            rubric_version=batch.rubric_version,
        )
