"""The CLI's account of what a study bought (Study.report), as the summary prints it."""

from __future__ import annotations

from loratune.optimizer.v1 import optimizer_pb2
from services.cli.optimizer_commands import report_lines


def _study(**report: object) -> optimizer_pb2.Study:
    study = optimizer_pb2.Study(study_id="s", objective_name="f1_macro")
    study.report.CopyFrom(optimizer_pb2.StudyReport(**report))  # type: ignore[arg-type]
    return study


def test_a_floor_published_over_a_best_within_noise_says_so() -> None:
    lines = report_lines(
        _study(
            floor_trial=0,
            floor_objective=0.8579,
            default_trial=1,
            default_objective=0.8545,
            selected_trial=7,
            selected_objective=0.8661,
            trials_compared=14,
            candidates=31,
            noise=0.0061,
            expected_optimism=0.0102,
            published_trial=0,
            warning="the best trial (#7, 0.8661) beats the floor ...: the floor was published",
        )
    )
    text = "\n".join(lines)
    assert "no test data was read" in lines[0]
    assert "floor (probe only), trial 0: 0.8579" in text
    assert "default trial 1: 0.8545" in text
    assert "best of 14: trial 7: 0.8661 (noise ±0.0061" in text
    assert "the best of 31 evaluations is ahead by ~0.0102 by chance" in text
    assert "published: trial 0 (the floor)" in text
    assert "the floor was published" in lines[-1]


def test_several_bases_list_each_floor() -> None:
    floors = [
        optimizer_pb2.BaseFloor(base_model="org/small", trial=0, objective=0.85),
        optimizer_pb2.BaseFloor(base_model="org/large", trial=1, objective=0.88),
    ]
    lines = report_lines(
        _study(
            floors=floors,
            floor_trial=1,
            floor_objective=0.88,
            selected_trial=9,
            selected_objective=0.91,
            trials_compared=12,
            noise=0.004,
            expected_optimism=0.0066,
            published_trial=9,
        )
    )
    text = "\n".join(lines)
    assert "floor of org/small, trial 0: 0.8500" in text
    assert "floor of org/large, trial 1: 0.8800" in text
    assert "published: trial 9" in text and "(the floor)" not in text


def test_a_published_ensemble_names_its_members_and_what_it_was_compared_with() -> None:
    lines = report_lines(
        _study(
            floor_trial=1,
            floor_objective=0.8664,
            selected_trial=1,
            selected_objective=0.8664,
            trials_compared=6,
            published_trial=1,
            ensemble_trials=[1, 0],
            ensemble_objective=0.8721,
            selected_macro_f1=0.8664,
            ensemble_published=True,
            ensemble_cross_validated=0.8736,
            single_cross_validated=0.8653,
        )
    )
    text = "\n".join(lines)
    assert "ensemble of each base's best and the floors (trials 1, 0): macro-F1 0.8721" in text
    assert "cross-validated on validation halves: ensemble 0.8736, single model 0.8653" in text
    assert "against the selected trial's 0.8664" in text
    assert "published: the ensemble of trials 1, 0" in text
