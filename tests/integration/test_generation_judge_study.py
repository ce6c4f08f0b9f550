"""A judged generation study through the four services as processes, the judge a fake Gemini.

`loratune serve optimizer | trainer | evaluator | judge-gateway`, each its own process on
loopback as in a deployment; the gateway's real google-genai SDK talks to a fake Gemini
(tests/fakes/gemini.py, Gemini's wire format) in this process, which judges by `rule` below.
The base model is a tiny Qwen3 built here, the data a few rows written here.

What a user of the seed's request (`use_llm_judge: true, judge_model_id: "gemini"`) relies
on: every trial is scored with BERTScore and the judge's mean over the same sample of
validation items, combined as 0.4 * BERTScore + 0.6 * judge / 100; the log lines they
know; and a judge that goes away mid-study delays the study instead of scoring a trial
with judgments missing, and shows on the trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc
from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.labels import trial_note
from services.evaluator.core.bertscore import packaged_minilm_path
from services.evaluator.core.evaluation import judge_sample
from tests.fakes.gemini import FakeGemini
from tests.fakes.http import RecordedRequest, Reply

REPO = Path(__file__).resolve().parents[2]
KEY = "AIzaSy-judge-study-secret"
SEED = 11  # the study's seed: the judge's sample is drawn with it
SAMPLE = 5  # the judge's sample (the evaluator's default)
VALIDATION_ROWS = 8
OUTAGE_SECONDS = 4.0
# The evaluator refuses (UNAVAILABLE) an evaluation whose judge sample is judged under this
# share. The whole sample here: an outage then always reaches the optimizer, and whatever
# the tiny model generates (an empty candidate is judged 0 without a provider call), every
# trial must be scored on its whole sample. Accepting a partial judgment (the default bar,
# 0.6) and showing it on the trial is tests/unit/optimizer/test_judge_coverage.py's.
MIN_COVERAGE = 1.0
SERVICES = ("judge-gateway", "evaluator", "trainer", "optimizer")


def rule(candidate: str, reference: str) -> int:
    """The fake judge's score: 20, plus 15 for each distinct word of the reference the
    candidate contains, plus the candidate's number of words modulo 25; at most 100."""
    words = candidate.split()
    shared = len(set(reference.split()) & set(words))
    return min(100, 20 + 15 * shared + len(words) % 25)


def _block(text: str, name: str) -> str:
    return text.split(f"<<<BEGIN {name}>>>\n", 1)[1].split(f"\n<<<END {name}>>>", 1)[0]


def judge_by_rule(request: RecordedRequest) -> Reply:
    """Reads the candidate and reference out of the gateway's prompt and scores them."""
    text = request.body["contents"][0]["parts"][0]["text"]
    score = rule(_block(text, "CANDIDATE"), _block(text, "REFERENCE"))
    return Reply.json_text(json.dumps({"reasoning": "compared with the reference", "score": score}))


# ---- the stack: four processes -----------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Stack:
    """The services' addresses, processes and log files."""

    addresses: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def log(self, service: str) -> str:
        """What the service has logged so far."""
        return self.logs[service].read_text(encoding="utf-8", errors="replace")

    def optimizer(self, channel: grpc.Channel) -> optimizer_pb2_grpc.OptimizerServiceStub:
        """A stub of the optimizer on `channel`."""
        return optimizer_pb2_grpc.OptimizerServiceStub(channel)

    @contextlib.contextmanager
    def logs_on_failure(self, lines: int = 40) -> Iterator[None]:
        """Prints the end of every service's log when the block fails (pytest shows it)."""
        try:
            yield
        except BaseException:
            for service in SERVICES:
                tail = self.log(service).splitlines()[-lines:]
                print(f"---- {service} (last {len(tail)} lines) ----", *tail, sep="\n")
            raise


def _environments(
    root: Path, gemini: FakeGemini, addresses: dict[str, str]
) -> dict[str, dict[str, str]]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LORATUNE_", "GEMINI_", "GOOGLE_", "GIGACHAT_"))
    }
    base |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LORATUNE_LOG_FORMAT": "plain",
        "LORATUNE_GRACE_PERIOD_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    return {
        "judge-gateway": base
        | {
            "GEMINI_API_KEY": KEY,
            "GOOGLE_GEMINI_BASE_URL": gemini.url,
            # One provider attempt per item and a short breaker cool-down: the outage reaches
            # the evaluator (and through it the optimizer) instead of being retried away here.
            "LORATUNE_JUDGE_MAX_ATTEMPTS": "1",
            "LORATUNE_JUDGE_BREAKER_COOLDOWN_SECONDS": "1",
            # No cache: every evaluation asks the fake, so the outage cannot be skipped.
            "LORATUNE_JUDGE_CACHE_ENTRIES": "0",
        },
        "evaluator": base
        | {
            "LORATUNE_BERTSCORE_MODEL": packaged_minilm_path(),
            "LORATUNE_BERTSCORE_LAYERS": "6",
            "LORATUNE_BERTSCORE_DEVICE": "cpu",
            "LORATUNE_JUDGE_ADDRESS": addresses["judge-gateway"],
            "LORATUNE_JUDGE_MIN_COVERAGE": str(MIN_COVERAGE),
            "LORATUNE_JUDGE_TIMEOUT_SECONDS": "60",
        },
        "trainer": base | {"LORATUNE_ARTIFACT_ROOT": str(root)},
        "optimizer": base
        | {
            "LORATUNE_TRAINERS": addresses["trainer"],
            "LORATUNE_EVALUATOR_ADDRESS": addresses["evaluator"],
            "LORATUNE_JUDGE_ADDRESS": addresses["judge-gateway"],
            "LORATUNE_ARTIFACT_ROOT": str(root),
            "LORATUNE_POLL_SECONDS": "0.2",
            "LORATUNE_EVALUATION_RETRY_SECONDS": "120",
        },
    }


def _wait_serving(stack: Stack, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for service, address in stack.addresses.items():
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                process = stack.processes[service]
                assert process.poll() is None, f"{service} exited:\n{stack.log(service)}"
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, f"{service} never became SERVING"
                time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=KEY) as fake:
        fake.responder = judge_by_rule
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, gemini: FakeGemini) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("judge-study")
    root = folder / "runs"
    addresses = {s: f"127.0.0.1:{p}" for s, p in zip(SERVICES, _free_ports(4), strict=True)}
    environments = _environments(root, gemini, addresses)
    stack = Stack(addresses, {}, {s: folder / f"{s}.log" for s in SERVICES})
    try:
        for service in SERVICES:
            with stack.logs[service].open("wb") as log:  # the child keeps its own descriptor
                stack.processes[service] = subprocess.Popen(
                    [
                        *(sys.executable, "-m", "services.cli.main", "serve", service),
                        *("--port", addresses[service].rsplit(":", 1)[1]),
                        *("--metrics-port", "-1"),
                    ],
                    cwd=REPO,
                    env=environments[service],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        _wait_serving(stack, 180)
        yield stack
    finally:
        # The optimizer first, so that it stops following jobs before their trainer goes.
        for service in reversed(SERVICES):
            if service in stack.processes:
                _stop(stack.processes[service])


# ---- the data ---------------------------------------------------------------------------------


def _rows(n: int, offset: int) -> list[dict[str, str]]:
    moods = ["good", "bad", "fine", "great", "awful", "okay"]
    return [
        {
            "prompt": f"w{(i + offset) % 48} is {moods[i % 6]}",
            "response": f"yes w{(i + offset) % 48} {moods[i % 6]} w{(3 * i + 5) % 48}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, str]]]:
    folder = tmp_path_factory.mktemp("generation-data")
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    held_out = _rows(VALIDATION_ROWS, offset=30)
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(16, offset=0)))
    validation.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return train, validation, held_out


def _request(
    name: str, model: Path, data: tuple[Path, Path, list[dict[str, str]]], judge: bool
) -> optimizer_pb2.CreateStudyRequest:
    train, validation, _ = data
    return optimizer_pb2.CreateStudyRequest(
        project_id=10,
        study_name=name,
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            use_llm_judge=judge,
            judge_model_id="gemini" if judge else "",
            base_model_name=str(model),
            n_trials=5,  # the contract's least
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(train),
            validation_uri=str(validation),
            task_type=common_pb2.TASK_TYPE_GENERATION,
            seed=SEED,
        ),
        search_space=optimizer_pb2.SearchSpace(
            rank=[4],
            num_epochs=[1],
            learning_rate=optimizer_pb2.FloatRange(low=3e-2, high=3e-1, log=True),
            target_modules=[optimizer_pb2.TargetModulesChoice(name="all-linear")],
        ),
        training=common_pb2.TrainingParams(batch_size=2, max_seq_length=32),
        max_parallel_trials=1,
        max_eval_samples=VALIDATION_ROWS,
        pruner="none",
    )


def _predictions(stack: Stack, job_id: str) -> list[str]:
    """The validation predictions a trial was scored on, as its trainer replays them."""
    with grpc.insecure_channel(stack.addresses["trainer"]) as channel:
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        events = trainer.WatchTraining(trainer_pb2.WatchTrainingRequest(job_id=job_id), timeout=30)
        evaluations = [e.evaluation for e in events if e.HasField("evaluation")]
    assert len(evaluations) == 1, job_id  # one epoch
    return list(evaluations[0].predictions)


# ---- the tests --------------------------------------------------------------------------------


def assert_rescaled_against_the_references(bert: common_pb2.BertScore) -> None:
    """The evaluator's default: F1 rescaled with a baseline from the study's references."""
    assert 0 <= bert.raw_f1 <= 1  # 0 when every generation was empty
    assert 0 < bert.baseline_f1 < 1
    assert "rescaled-refs:" in bert.hash
    # (s - b) / (1 - b) per pair, with b > 0, lowers every score below 1 (pairs with an
    # empty text stay 0, so the mean is not exactly the mean's rescaling; the formula is
    # checked in tests/unit/evaluator/test_rescaling.py).
    assert bert.f1 <= bert.raw_f1


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_judged_study_scores_every_trial_on_one_sample_and_waits_out_a_judge_outage(
    stack: Stack,
    gemini: FakeGemini,
    tiny_qwen: Path,
    data: tuple[Path, Path, list[dict[str, str]]],
) -> None:
    with stack.logs_on_failure():
        references = [row["response"] for row in data[2]]
        with grpc.insecure_channel(stack.addresses["optimizer"]) as channel:
            optimizer = stack.optimizer(channel)
            optimizer.CreateStudy(_request("judged", tiny_qwen, data, judge=True), timeout=60)
            watched = optimizer.WatchStudy(
                optimizer_pb2.WatchStudyRequest(study_id="judged"), timeout=300
            )
            evaluated: list[optimizer_pb2.TrialEvaluated] = []
            for event in watched:
                if event.HasField("trial_evaluated"):
                    evaluated.append(event.trial_evaluated)
                    if event.trial_evaluated.number == 0:
                        # The judge goes away when next asked (the next trial's evaluation), and
                        # stays away OUTAGE_SECONDS: longer than the evaluator's own quick retries.
                        gemini.outage(OUTAGE_SECONDS)
            study = optimizer.GetStudy(optimizer_pb2.GetStudyRequest(study_id="judged")).study
            trials = optimizer.ListTrials(optimizer_pb2.ListTrialsRequest(study_id="judged")).trials
        optimizer_log, evaluator_log = stack.log("optimizer"), stack.log("evaluator")

        assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
        assert study.trials_complete == 5 and study.trials_failed == 0 and len(trials) == 5
        assert study.objective_name == "combined"
        assert gemini.outage_replies >= 1, "the outage was never reached: the test proves nothing"
        assert not gemini.handler_errors

        # Every trial: BERTScore, the judge's mean over the same sample (drawn with the study's
        # seed), its coverage, and 0.4 * BERTScore + 0.6 * judge / 100 as the objective.
        sample = judge_sample(VALIDATION_ROWS, SAMPLE, SEED)
        for trial in trials:
            result = trial.evaluation
            assert result.HasField("bertscore")
            assert_rescaled_against_the_references(result.bertscore)
            assert result.num_examples == VALIDATION_ROWS
            judge = result.judge
            assert judge.judge_model_id == "gemini"
            assert tuple(judge.sample_indices) == sample
            assert judge.requested == SAMPLE and judge.judged == SAMPLE and judge.coverage == 1.0
            assert trial.judge_coverage == judge.coverage
            assert (trial.judge_judged, trial.judge_requested) == (SAMPLE, SAMPLE)
            # The judge's mean, from the rule, over the very predictions the trial was scored on
            # (an empty one is worth 0 and never sent to the judge).
            predictions = _predictions(stack, f"judged-t{trial.number}-a{trial.attempt}")
            expected = [
                rule(predictions[i], references[i]) if predictions[i].strip() else 0 for i in sample
            ]
            assert judge.mean_score == pytest.approx(sum(expected) / SAMPLE, abs=1e-9)
            combined = 0.4 * result.bertscore.f1 + 0.6 * judge.mean_score / 100
            assert result.combined_score == pytest.approx(combined, abs=1e-9)
            assert result.objective == result.combined_score == pytest.approx(trial.objective)
            # The lines users know, in the optimizer's log and the evaluator's.
            assert f"Trial {trial.number}: params=" in optimizer_log
            assert re.search(
                rf"Trial {trial.number}: params=\{{.*\}}, BERTScore={result.bertscore.f1:.4f}",
                optimizer_log,
            )
            detailed = (
                f"Detailed evaluation: BERTScore={result.bertscore.f1:.4f}, "
                f"LLM Judge={judge.mean_score:.2f}, Combined={combined:.4f}"
            )
            assert detailed in optimizer_log and detailed in evaluator_log
            assert f"LLM Judge mean score: {judge.mean_score:.2f} (on {SAMPLE} examples)" in (
                evaluator_log
            )
        assert "LLM Judge enabled with model: gemini" in evaluator_log

        # The outage: one trial's evaluation was refused (the judge away, or too little of its
        # sample judged) and asked again until judged whole; no other trial was touched, and
        # none was scored with judgments missing (coverage 1 everywhere, above).
        refused = [t for t in trials if t.evaluation_refusals]
        assert len(refused) == 1, [(t.number, t.evaluation_refusals) for t in trials]
        hit = refused[0]
        assert hit.number >= 1
        assert re.search(r"judge|coverage", hit.last_evaluation_refusal), (
            hit.last_evaluation_refusal
        )
        assert len(hit.last_evaluation_refusal) <= 300
        assert f"scored after {hit.evaluation_refusals} refused evaluation attempts" in trial_note(
            hit
        )
        assert [e.evaluation_refusals for e in evaluated] == [t.evaluation_refusals for t in trials]
        assert (
            f"Trial {hit.number}: scored after {hit.evaluation_refusals} refused" in optimizer_log
        )
        assert optimizer_log.count("evaluation refused (") == hit.evaluation_refusals
        curve = json.loads((Path(hit.artifact_dir) / "evaluation_curve.json").read_text())
        assert curve["epochs"][0]["refusals"] == hit.evaluation_refusals
        assert KEY not in optimizer_log + evaluator_log + stack.log("judge-gateway")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_study_without_the_judge_is_scored_by_bertscore_alone(
    stack: Stack,
    gemini: FakeGemini,
    tiny_qwen: Path,
    data: tuple[Path, Path, list[dict[str, str]]],
) -> None:
    with stack.logs_on_failure():
        asked = len(gemini.requests)
        with grpc.insecure_channel(stack.addresses["optimizer"]) as channel:
            optimizer = stack.optimizer(channel)
            optimizer.CreateStudy(_request("unjudged", tiny_qwen, data, judge=False), timeout=60)
            first = None
            for event in optimizer.WatchStudy(
                optimizer_pb2.WatchStudyRequest(study_id="unjudged"), timeout=240
            ):
                if event.HasField("trial_finished") and event.trial_finished.trial.number == 0:
                    first = event.trial_finished.trial
                    break
            # One trial tells what is needed; the contract's 5 would only take longer.
            optimizer.CancelStudy(optimizer_pb2.CancelStudyRequest(study_id="unjudged"), timeout=60)
        assert first is not None and first.state == optimizer_pb2.TRIAL_STATE_COMPLETE
        result = first.evaluation
        assert not result.HasField("judge") and not first.HasField("judge_coverage")
        assert result.HasField("bertscore")
        assert_rescaled_against_the_references(result.bertscore)
        assert result.combined_score == pytest.approx(result.bertscore.f1, abs=1e-12)
        assert (
            result.objective
            == pytest.approx(result.combined_score)
            == pytest.approx(first.objective)
        )
        assert len(gemini.requests) == asked  # the judge was never asked
        evaluator_log, optimizer_log = stack.log("evaluator"), stack.log("optimizer")
        assert "LLM Judge disabled, using BERTScore only" in evaluator_log
        detailed = (
            f"Detailed evaluation: BERTScore={result.bertscore.f1:.4f}, "
            f"Combined={result.combined_score:.4f}"
        )
        assert detailed in evaluator_log and detailed in optimizer_log
