"""Trainers scaled from zero and back by the rendered ScaledObject, in a simulation with
real trainer processes (tests/integration/keda_simulation.py), the real optimizer and
evaluator, and the optimizer's Kubernetes discovery and pod-deletion-cost annotations
against an API server that speaks the pods' REST shapes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.client import ClientSettings
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.server import start_server
from services.optimizer import metrics
from services.optimizer.config import OptimizerSettings
from services.optimizer.main import build_optimizer
from services.optimizer.main import service_definition as optimizer_definition
from tests.integration.keda_simulation import (
    NAMESPACE,
    TRAINER_PORT,
    Cluster,
    Scaling,
    trainer_environment,
)
from tests.integration.test_optimizer_resilience import FINISHED, start_evaluator
from tests.unit.deploy.conftest import K8S, find, render

# Manifest seconds x this: the 900 s cooldown lasts 18 s, a 15 s poll 0.3 s.
TIME_SCALE = 0.02
N_TRIALS = 20
# Scale-ins from outside the autoscaler (`kubectl scale`, one pod less) while the study runs:
# after these numbers of trials have finished.
FORCED_SCALE_INS = (3, 8, 13)


def _request(dataset: Path, model: Path) -> optimizer_pb2.CreateStudyRequest:
    return optimizer_pb2.CreateStudyRequest(
        project_id=3,
        study_name="from-zero",
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name=str(model), n_trials=N_TRIALS
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(dataset), task_type=common_pb2.TASK_TYPE_CLASSIFICATION, seed=1
        ),
        search_space=optimizer_pb2.SearchSpace(
            rank=[4],
            num_epochs=[1],
            learning_rate=optimizer_pb2.FloatRange(low=1e-3, high=1e-2, log=True),
        ),
        training=common_pb2.TrainingParams(batch_size=4, max_seq_length=16),
        pruner="none",
        max_parallel_trials=3,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~75 s on 2 idle cores; trainers start slower on a loaded machine
async def test_trainers_scale_from_zero_for_a_study_and_back_sparing_busy_ones(
    tmp_path: Path, sentiment: Path, tiny_qwen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scaled_object = find(render(K8S / "overlays" / "gpu-keda"), "ScaledObject", "loratune-trainer")
    root = tmp_path / "runs"
    evaluator = await start_evaluator()
    server = None
    cluster: Cluster | None = None
    stop = asyncio.Event()
    autoscaler: asyncio.Task[None] | None = None
    try:
        # The optimizer as main.py builds it for a cluster: Kubernetes discovery (the
        # official client, configured from KUBECONFIG) and its /metrics on HTTP.
        scaling = Scaling.from_manifest(scaled_object, TIME_SCALE)
        # The optimizer's gauges are the process's: what earlier tests left is no data.
        metrics.TRIALS_WAITING.set(0)
        metrics.TRAINERS.clear()
        optimizer, channels = build_optimizer(
            OptimizerSettings(
                k8s_namespace=NAMESPACE,
                k8s_trainer_port=TRAINER_PORT,
                evaluator_address=evaluator.address,
                artifact_root=root,
                poll_seconds=0.2,
                max_trial_failures=1,  # one counted failure would end the study FAILED
            ),
            TrainingDefaults(),
            ClientSettings(max_attempts=1),
        )
        server = await start_server(
            [optimizer_definition(optimizer, channels)],
            CommonSettings(),
            host="127.0.0.1",
            metrics_port=0,
        )
        cluster = Cluster(
            scaling,
            f"http://127.0.0.1:{server.metrics_port}/metrics",
            tmp_path,
            trainer_environment(root),
        )
        monkeypatch.setenv("KUBECONFIG", str(cluster.api.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        autoscaler = asyncio.create_task(cluster.run(stop))
        await asyncio.sleep(scaling.polling * 3)
        assert cluster.replicas == 0 and not cluster.pods  # nothing wants a trainer

        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            created = time.monotonic()
            await stub.CreateStudy(_request(sentiment, tiny_qwen))
            waited: list[str] = []
            first_started: float | None = None
            forced = list(FORCED_SCALE_INS)
            ended = 0
            final = None
            async for event in stub.WatchStudy(
                optimizer_pb2.WatchStudyRequest(study_id="from-zero")
            ):
                now = time.monotonic()
                if event.HasField("study_waiting"):
                    waited.append(event.study_waiting.reason)
                if event.HasField("trial_started") and first_started is None:
                    first_started = now
                if event.HasField("trial_finished"):
                    ended += 1
                if forced and ended >= forced[0] and len(cluster.live_pods()) >= 2:
                    forced.pop(0)
                    await asyncio.to_thread(cluster.scale_in_now)
                if event.HasField("study_finished"):
                    final = event.study_finished.study
                    break
            finished_at = time.monotonic()
            trials = (
                await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="from-zero"))
            ).trials
        # After the study: back to zero once the cooldown has passed.
        deadline = finished_at + scaling.cooldown + 30
        while (cluster.replicas or cluster.pods) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        zero_at = time.monotonic()
    finally:
        stop.set()
        if autoscaler is not None:
            await autoscaler
        if server is not None:
            await server.stop(1)
        await evaluator.stop(1)
        if cluster is not None:
            cluster.close()

    # 1. Accepted with no trainer, waiting visibly; the first trial started within the
    #    polling period plus a trainer's start (and the optimizer's own look at the pool).
    assert waited and waited[0] == "waiting for a trainer: 0 ready", waited
    assert first_started is not None and cluster.start_seconds
    budget = scaling.polling + max(cluster.start_seconds) + 0.2 + 2.0
    assert first_started - created <= budget, (first_started - created, budget)
    # 2. The study completed, exactly n_trials finished, none counted as failed, the
    #    interrupted ones (busy trainers removed while all were busy) run again.
    assert final is not None and final.state == optimizer_pb2.STUDY_STATE_COMPLETED
    assert final.trials_failed == 0
    assert len([t for t in trials if t.state in FINISHED]) == N_TRIALS
    # 3. Scale-ins happened during the study, and none removed a busy trainer while an idle
    #    one existed.
    during = [r for r in cluster.removals if r.at < finished_at]
    assert len(during) >= 2, cluster.removals
    for removal in cluster.removals:
        assert not (removal.busy and removal.idle_existed), removal
    # 4. Back to zero after the cooldown, not before.
    assert cluster.replicas == 0 and not cluster.pods
    assert scaling.cooldown * 0.9 <= zero_at - finished_at <= scaling.cooldown + 30
    assert max(replicas for _, replicas, _ in cluster.history) <= scaling.max_replicas
    print(
        f"first trial {first_started - created:.1f} s after CreateStudy (trainer start "
        f"{min(cluster.start_seconds):.1f}-{max(cluster.start_seconds):.1f} s); "
        f"{len(cluster.removals)} scale-ins ({sum(r.busy for r in cluster.removals)} of a busy "
        f"trainer, all while none was idle); zero {zero_at - finished_at:.1f} s after the "
        f"study (cooldown {scaling.cooldown:.1f} s)"
    )
