"""The evaluator's composition root: settings -> core -> gRPC server."""

from __future__ import annotations

import logging

from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.client import ClientSettings, create_channel
from services.common.config import CommonSettings
from services.common.server import ServiceDefinition, run
from services.common.threads import configure_torch_threads
from services.evaluator.api.servicer import EvaluatorServicer
from services.evaluator.config import EvaluatorSettings
from services.evaluator.core.bertscore import (
    BertScoreEngine,
    default_model,
    packaged_baseline,
)
from services.evaluator.core.evaluation import Evaluator, EvaluatorOptions
from services.evaluator.core.rescaling import RescaleMode
from services.evaluator.judge_client import GrpcJudgeScorer
from services.evaluator.metrics import EvaluatorMetrics

logger = logging.getLogger(__name__)

SERVICE_NAME = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name


def _bertscore_model(settings: EvaluatorSettings) -> tuple[str, int | None]:
    """The BERTScore model and layer the settings name (bert-score's default when empty)."""
    model, layers = settings.bertscore_model, settings.bertscore_layers
    if not model:
        model, default_layers = default_model()
        layers = layers or default_layers
    return model, layers


def _check_packaged_baseline(settings: EvaluatorSettings) -> None:
    """Fails at start-up, naming the variable, when bert-score ships no baseline to use."""
    model, layers = _bertscore_model(settings)
    try:
        packaged_baseline(model, layers, settings.bertscore_lang)
    except ValueError as exc:
        raise ValueError(
            f"LORATUNE_BERTSCORE_RESCALE=packaged cannot be used: {exc} "
            "(LORATUNE_BERTSCORE_RESCALE=references computes a baseline from the references)"
        ) from exc


def build_evaluator(settings: EvaluatorSettings, client: ClientSettings | None = None) -> Evaluator:
    """The evaluator core wired to its BERTScore engine and, when configured, the judge.

    Raises:
        ValueError: ``LORATUNE_BERTSCORE_RESCALE=packaged`` for a model bert-score ships no
            baseline for (checked without loading the model).
    """
    if settings.bertscore_rescale is RescaleMode.PACKAGED:
        _check_packaged_baseline(settings)

    def make_engine() -> BertScoreEngine:
        model, layers = _bertscore_model(settings)
        logger.info("loading BERTScore model %s (layer %s)", model, layers or "default")
        # Built unrescaled: each evaluation passes the baseline its rescaling asks for.
        return BertScoreEngine(
            model_type=model,
            num_layers=layers,
            batch_size=settings.bertscore_batch_size,
            device=settings.bertscore_device or None,
            idf=settings.bertscore_idf,
            lang=settings.bertscore_lang,
            cache_max_bytes=settings.bertscore_cache_bytes,
        )

    judge = None
    if settings.judge_address:
        channel = create_channel(settings.judge_address, client or ClientSettings.from_env())
        judge = GrpcJudgeScorer(channel)
    evaluator = Evaluator(
        bertscorer_factory=make_engine,
        judge=judge,
        options=EvaluatorOptions(
            judge_min_coverage=settings.judge_min_coverage,
            judge_timeout_seconds=settings.judge_timeout_seconds,
            bertscore_rescale=settings.bertscore_rescale,
        ),
        metrics=EvaluatorMetrics(),
    )
    if settings.bertscore_preload:
        evaluator.bertscorer()
    return evaluator


def service_definition(evaluator: Evaluator) -> ServiceDefinition:
    """The evaluator as a service the common bootstrap serves."""
    servicer = EvaluatorServicer(evaluator)
    return ServiceDefinition(
        full_name=SERVICE_NAME,
        register=lambda server: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(
            servicer, server
        ),
    )


def main(port: int, metrics_port: int | None) -> int:
    """Serves the evaluator until SIGTERM / SIGINT; returns the exit code."""
    common = CommonSettings()
    configure_torch_threads(common.torch_threads)
    settings = EvaluatorSettings()
    return run(
        lambda: [service_definition(build_evaluator(settings))],
        common,
        port=port,
        metrics_port=metrics_port,
    )
