"""Fixtures: a real evaluator server on 127.0.0.1:0 and a fake judge gateway on a real port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from loratune.evaluator.v1 import evaluator_pb2_grpc
from loratune.judge.v1 import judge_pb2, judge_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.server import RunningServer, ServiceDefinition, start_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.main import build_evaluator, service_definition

os.environ.setdefault("HF_HUB_OFFLINE", "1")

JUDGE_SERVICE = judge_pb2.DESCRIPTOR.services_by_name["JudgeGatewayService"].full_name


@dataclass
class FakeJudgeGateway(judge_pb2_grpc.JudgeGatewayServiceServicer):
    """Scripted JudgeGatewayService: scores by candidate, or a scripted error."""

    scores: dict[str, float | None] = field(default_factory=dict)
    default_score: float = 70.0
    known_models: tuple[str, ...] = ("gemini", "gigachat")
    fail_with: tuple[grpc.StatusCode, str] | None = None
    requests: list[judge_pb2.ScoreResponsesRequest] = field(default_factory=list)

    async def ScoreResponses(
        self, request: judge_pb2.ScoreResponsesRequest, context: grpc.aio.ServicerContext
    ) -> judge_pb2.ScoreResponsesResponse:
        self.requests.append(request)
        if self.fail_with is not None:
            await context.abort(*self.fail_with)
        model = request.judge_model_id or self.known_models[0]
        if model not in self.known_models:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"LLM Judge model not found: '{model}' (available: {', '.join(self.known_models)})",
            )
        out = []
        for item in request.items:
            score = self.scores.get(item.candidate, self.default_score)
            if score is None:
                out.append(judge_pb2.JudgeScore(outcome=judge_pb2.JUDGE_OUTCOME_PARSE_FAILED))
            else:
                out.append(judge_pb2.JudgeScore(score=score, outcome=judge_pb2.JUDGE_OUTCOME_OK))
        valid = [s.score for s in out if s.HasField("score")]
        return judge_pb2.ScoreResponsesResponse(
            scores=out,
            mean_score=sum(valid) / len(valid) if valid else 0.0,
            judged=len(valid),
            provider_model=f"{model}-fake-001",
        )


@dataclass
class EvaluatorHarness:
    """A running evaluator, its stub, and the fake judge behind it."""

    server: RunningServer
    channel: grpc.aio.Channel
    stub: evaluator_pb2_grpc.EvaluatorServiceStub
    judge: FakeJudgeGateway


MAX_MESSAGE_BYTES = 2 * 2**20


@pytest.fixture
async def judge_gateway() -> AsyncIterator[tuple[FakeJudgeGateway, RunningServer]]:
    fake = FakeJudgeGateway()
    server = await start_server(
        [
            ServiceDefinition(
                full_name=JUDGE_SERVICE,
                register=lambda s: judge_pb2_grpc.add_JudgeGatewayServiceServicer_to_server(
                    fake, s
                ),
            )
        ],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=None,
    )
    yield fake, server
    await server.stop(0)


@pytest.fixture
async def evaluator(
    judge_gateway: tuple[FakeJudgeGateway, RunningServer],
) -> AsyncIterator[EvaluatorHarness]:
    fake, judge_server = judge_gateway
    settings = EvaluatorSettings(
        bertscore_model=packaged_minilm_path(),
        bertscore_layers=6,
        judge_address=judge_server.address,
        bertscore_cache_bytes=64 * 2**20,
        # Raw scores, so that tests compare them with bert_score.score; the default
        # (references) has its own server in test_evaluator_api.py.
        bertscore_rescale="none",
    )
    evaluator_core = build_evaluator(settings, ClientSettings(max_attempts=1))
    server = await start_server(
        [service_definition(evaluator_core)],
        CommonSettings(max_message_bytes=MAX_MESSAGE_BYTES),
        host="127.0.0.1",
        metrics_port=0,
    )
    channel = grpc.aio.insecure_channel(server.address)
    yield EvaluatorHarness(server, channel, evaluator_pb2_grpc.EvaluatorServiceStub(channel), fake)
    await channel.close()
    await server.stop(0)
