"""A judged study's trials show how their scores came about: judge coverage and refusals.

The optimizer core on fake ports: a fake evaluator that judges all, part or (refusing as
the real one does) too little of its sample, or finds the judge away.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from loratune.common.v1 import common_pb2
from loratune.optimizer.v1 import optimizer_pb2
from services.common.errors import Unavailable
from services.common.labels import trial_note
from services.optimizer.api.convert import evaluation_from_proto, event_to_proto, trial_to_proto
from services.optimizer.core.ports import Evaluation, EvaluationRequest
from services.optimizer.core.views import ScoredWith, scored_with
from tests.unit.optimizer.test_optimizer_core import (
    FakeTrainers,
    _generation,
    create,
    create_with,
    make,
    trials_of,
)

LOW_COVERAGE = (
    "evaluator: the LLM judge scored only 1 of 5 sampled items (coverage 0.20 < "
    "LORATUNE_JUDGE_MIN_COVERAGE=0.6); no combined score is returned, so that it is never "
    "defined differently from other trials"
)
JUDGE_AWAY = (
    "evaluator: judge gateway: judge model 'gemini' could not judge any of 5 items: "
    "server: 503 UNAVAILABLE. The model is overloaded."
)


class JudgedEvaluator:
    """Scores generation: BERTScore F1 from the fake trainer's prediction, the judge's part
    from a script, one reply per call in order: an exception to raise, or how many of the
    5 sampled items the judge scored (each at 70). Unscripted calls judge all 5."""

    def __init__(self, *replies: Exception | int) -> None:
        self.replies: collections.deque[Exception | int] = collections.deque(replies)
        self.requests: list[EvaluationRequest] = []

    async def evaluate(self, request: EvaluationRequest) -> Evaluation:
        self.requests.append(request)
        reply = self.replies.popleft() if self.replies else 5
        if isinstance(reply, Exception):
            raise reply
        bertscore = min(float(request.predictions[0]), 1.0)
        combined = 0.4 * bertscore + 0.6 * 70 / 100
        return evaluation_from_proto(
            common_pb2.EvaluationResult(
                task_type=common_pb2.TASK_TYPE_GENERATION,
                bertscore=common_pb2.BertScore(f1=bertscore),
                judge=common_pb2.JudgeSummary(
                    judge_model_id="gemini",
                    mean_score=70.0,
                    judged=reply,
                    requested=5,
                    coverage=reply / 5,
                    sample_indices=[0, 1, 2, 3, 4],
                ),
                combined_score=combined,
                objective=combined,
                objective_name="combined",
            )
        )


def _judged_study(tmp_path: Path, name: str, n: int = 5) -> optimizer_pb2.CreateStudyRequest:
    data = tmp_path / "unused.jsonl"
    data.write_text(json.dumps({"text": "a", "label": "b"}) + "\n")
    request = create(data, n=n, name=name, pruner="none", max_parallel_trials=1)
    _generation(request, tmp_path)
    request.fine_tuning_params.judge_model_id = "gemini"
    return request


async def _run(
    tmp_path: Path,
    evaluator: JudgedEvaluator,
    request: optimizer_pb2.CreateStudyRequest,
    epochs: int = 1,
    **options: float,
) -> tuple[optimizer_pb2.Study, list[optimizer_pb2.Trial], list[optimizer_pb2.StudyEvent]]:
    trainers = FakeTrainers(epochs=epochs)
    optimizer = make(tmp_path, trainers, evaluator, **options)  # type: ignore[arg-type]
    study = await create_with(optimizer, request)
    events = [event_to_proto(e) async for e in optimizer.watch(study.study_id)]
    final = events[-1].study_finished.study
    return final, await trials_of(optimizer, study.study_id), events


async def test_a_judge_away_for_a_while_is_waited_for_and_the_refusals_show_on_the_trial(
    tmp_path: Path,
) -> None:
    # The first trial is judged; the second's evaluation is refused twice (too little of the
    # sample judged, then the judge away), then judged whole; the rest are judged at once.
    evaluator = JudgedEvaluator(5, Unavailable(LOW_COVERAGE), Unavailable(JUDGE_AWAY))
    study, trials, events = await _run(tmp_path, evaluator, _judged_study(tmp_path, "away"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    assert study.trials_complete == 5 and study.trials_failed == 0
    # Refused attempts were asked again with the same predictions, never scored without them.
    assert len(evaluator.requests) == 5 + 2
    assert evaluator.requests[1].predictions == evaluator.requests[3].predictions
    assert [t.evaluation_refusals for t in trials] == [0, 2, 0, 0, 0]
    away = trials[1]
    assert away.last_evaluation_refusal == JUDGE_AWAY
    assert away.judge_coverage == 1.0 and (away.judge_judged, away.judge_requested) == (5, 5)
    assert away.evaluation.judge.coverage == 1.0 and away.objective == pytest.approx(
        away.evaluation.combined_score
    )
    assert all(not t.last_evaluation_refusal for t in trials if t.number != 1)
    # Watchers see it as it happens.
    evaluated = [e.trial_evaluated for e in events if e.HasField("trial_evaluated")]
    assert [e.evaluation_refusals for e in evaluated] == [0, 2, 0, 0, 0]
    assert evaluated[1].last_evaluation_refusal == JUDGE_AWAY
    assert "scored after 2 refused evaluation attempts" in trial_note(away)
    assert "judge model 'gemini' could not judge" in trial_note(away)
    assert trial_note(trials[0]) == ""


async def test_a_partially_judged_evaluation_shows_its_coverage_on_the_trial(
    tmp_path: Path,
) -> None:
    # 4 of 5 judged is over LORATUNE_JUDGE_MIN_COVERAGE: the evaluator scores it, and the
    # trial must say that its judge mean stands on 4 items, not 5.
    evaluator = JudgedEvaluator(5, 4)
    study, trials, _ = await _run(tmp_path, evaluator, _judged_study(tmp_path, "part"))
    assert study.state == optimizer_pb2.STUDY_STATE_COMPLETED, study.failure_reason
    partial = trials[1]
    assert partial.judge_coverage == pytest.approx(0.8)
    assert (partial.judge_judged, partial.judge_requested) == (4, 5)
    assert partial.evaluation.judge.coverage == pytest.approx(0.8)
    assert partial.evaluation_refusals == 0
    assert [t.judge_coverage for t in trials] == pytest.approx([1.0, 0.8, 1.0, 1.0, 1.0])
    assert "judged 4 of 5 sampled items (coverage 0.80)" in trial_note(partial)
    stored = json.loads((Path(partial.artifact_dir) / "evaluation_curve.json").read_text())
    assert stored["epochs"][0]["judge_judged"] == 4
    assert stored["epochs"][0]["judge_coverage"] == pytest.approx(0.8)


async def test_the_coverage_shown_is_the_kept_epochs_not_the_last_ones(tmp_path: Path) -> None:
    # Every trial: epoch 1 judged whole after one refusal, epoch 2 (the best: the fake
    # trainer's score rises with epochs) judged on 4 of 5, epoch 3 judged whole again.
    evaluator = JudgedEvaluator(*([Unavailable(LOW_COVERAGE), 5, 4, 5] * 5))
    trainers_curve = [0.5, 0.9, 0.7]
    trainers = FakeTrainers(epochs=3)
    trainers.curve = trainers_curve
    optimizer = make(tmp_path, trainers, evaluator)  # type: ignore[arg-type]
    study = await create_with(optimizer, _judged_study(tmp_path, "kept"))
    async for _ in optimizer.watch(study.study_id):
        pass
    trials = await trials_of(optimizer, study.study_id)
    assert all(t.state == optimizer_pb2.TRIAL_STATE_COMPLETE for t in trials)
    for trial in trials:
        assert trial.best_epoch == 2
        assert trial.judge_coverage == pytest.approx(0.8) and trial.judge_judged == 4
        assert trial.evaluation.judge.judged == 4  # the kept epoch's document
        assert trial.evaluation_refusals == 0  # epoch 2 was not refused; epoch 1 was


async def test_a_judge_that_never_comes_back_fails_the_study_saying_how_often(
    tmp_path: Path,
) -> None:
    evaluator = JudgedEvaluator(*([Unavailable(JUDGE_AWAY)] * 10))
    study, trials, _ = await _run(
        tmp_path, evaluator, _judged_study(tmp_path, "gone"), evaluation_retry_seconds=0.6
    )
    assert study.state == optimizer_pb2.STUDY_STATE_FAILED
    # 0.5 s wait fits the 0.6 s budget, the next 1 s does not: two attempts, both refused.
    assert "refused 2 times" in study.failure_reason
    assert "could not judge any of 5 items" in study.failure_reason
    assert trials[0].state == optimizer_pb2.TRIAL_STATE_FAIL
    assert not trials[0].HasField("objective")  # never scored without its judgments


def test_epoch_records_written_before_coverage_was_kept_read_as_unknown() -> None:
    assert scored_with({}) is None
    old = scored_with({"epochs": [{"epoch": 1, "objective": 0.5, "judge_mean": 70.0}]})
    assert old == ScoredWith() and old.judge_coverage is None
    view = scored_with(
        {
            "best_epoch": 1,
            "epochs": [
                {"epoch": 1, "objective": 0.6, "judge_judged": 3, "judge_requested": 5},
                {"epoch": 2, "objective": 0.5, "judge_judged": 5, "judge_requested": 5},
            ],
        }
    )
    assert view is not None and view.judge_coverage == pytest.approx(0.6)


def test_a_trial_without_the_judge_has_no_coverage() -> None:
    from services.optimizer.core.views import TrialView

    view = TrialView(
        number=0,
        state="COMPLETE",
        hyperparameters=None,
        evaluation=None,
        artifact_dir="",
        trainer="",
        attempt=1,
        failure_reason="",
        start_time=None,
        end_time=None,
        objective=0.5,
        best_epoch=1,
        epoch_objectives=[0.5],
        interruptions=[],
        scored_with=ScoredWith(),
    )
    message = trial_to_proto(view)
    assert not message.HasField("judge_coverage") and message.judge_requested == 0
