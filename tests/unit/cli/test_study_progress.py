"""What `loratune tune` / `watch` show while following a study: the wait for a trainer."""

from __future__ import annotations

from loratune.optimizer.v1 import optimizer_pb2
from services.cli.optimizer_commands import StudyProgress


def test_a_wait_for_a_trainer_is_shown_until_a_trial_starts() -> None:
    study = optimizer_pb2.Study(study_id="s", waiting_reason="waiting for a trainer: 0 ready")
    study.fine_tuning_params.n_trials = 5
    progress = StudyProgress(study, [])
    assert progress.running_text() == "waiting for a trainer: 0 ready"
    event = optimizer_pb2.StudyEvent(study_id="s")
    event.study_waiting.reason = "waiting for a trainer: 1 ready, all busy"
    event.study_waiting.since.FromSeconds(3600 * 5 + 60 * 4 + 3)
    assert progress.apply(event) == "waiting for a trainer: 1 ready, all busy (since 05:04:03 UTC)"
    assert progress.running_text() == "waiting for a trainer: 1 ready, all busy"
    started = optimizer_pb2.StudyEvent(study_id="s")
    started.trial_started.trial.CopyFrom(
        optimizer_pb2.Trial(number=0, state=optimizer_pb2.TRIAL_STATE_RUNNING, trainer="t:1")
    )
    assert "trial 0 started on t:1" in (progress.apply(started) or "")
    assert progress.running_text() == "#0 starting"
