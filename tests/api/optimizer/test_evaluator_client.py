"""The optimizer's evaluator client over gRPC: every refusal reaches the core, none is hidden.

A refused evaluation (the judge away, too little of its sample judged) is UNAVAILABLE;
the optimizer's Scoring retries it with its own backoff and counts it on the trial, so
gRPC's transparent retry must not re-run it (BERTScore and the judge) behind its back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from loratune.common.v1 import common_pb2
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.client import ClientSettings
from services.common.errors import Unavailable
from services.optimizer.clients import Channels, GrpcEvaluator
from services.optimizer.core.ports import EvaluationRequest, JudgeOptions


class RefusingEvaluator(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """Refuses the first `refusals` calls as the evaluator does at low judge coverage."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.calls = 0

    async def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> evaluator_pb2.EvaluateResponse:
        self.calls += 1
        if self.calls <= self.refusals:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the LLM judge scored only 1 of 5 sampled items (coverage 0.20 < "
                "LORATUNE_JUDGE_MIN_COVERAGE=0.6)",
            )
        return evaluator_pb2.EvaluateResponse(
            result=common_pb2.EvaluationResult(
                task_type=common_pb2.TASK_TYPE_GENERATION,
                bertscore=common_pb2.BertScore(f1=0.5),
                judge=common_pb2.JudgeSummary(judged=5, requested=5, coverage=1.0),
                combined_score=0.62,
                objective=0.62,
                objective_name="combined",
            )
        )


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[RefusingEvaluator, str]]:
    servicer = RefusingEvaluator(refusals=1)
    server = grpc.aio.server()
    evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


REQUEST = EvaluationRequest(
    classification=False,
    predictions=["a b"],
    references=["a c"],
    judge=JudgeOptions(enabled=True, judge_model_id="gemini", seed=3),
)


async def test_a_refused_evaluation_is_asked_once_and_reaches_the_caller(
    refusing: tuple[RefusingEvaluator, str],
) -> None:
    servicer, address = refusing
    # The default settings retry UNAVAILABLE up to 4 times for every other call.
    channels = Channels(ClientSettings())
    client = GrpcEvaluator(channels, address)
    with pytest.raises(Unavailable, match=r"coverage 0\.20"):
        await client.evaluate(REQUEST)
    assert servicer.calls == 1
    evaluation = await client.evaluate(REQUEST)
    assert servicer.calls == 2
    assert evaluation.figures["judge_coverage"] == 1.0
    assert evaluation.objective == pytest.approx(0.62)
    await channels.close()
