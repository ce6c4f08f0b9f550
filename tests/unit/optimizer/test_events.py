"""The event bus: replay then follow, bounded per study, dropped after a study finishes."""

from __future__ import annotations

import asyncio

from services.optimizer.core.events import EventBus, StudyFinished, TrialProgress
from services.optimizer.core.records import DatasetRef, FineTuning, StudyRecord, StudySpec
from services.optimizer.core.space import default_space
from services.optimizer.core.views import StudyView


def _finished(study_id: str) -> StudyFinished:
    spec = StudySpec(7, FineTuning(), DatasetRef(), default_space(True))
    return StudyFinished(StudyView(study_id, StudyRecord(spec=spec), {}, None))


async def test_a_watcher_gets_the_recent_events_then_live_ones_until_the_end() -> None:
    bus = EventBus()
    bus.publish("s", TrialProgress(0, 0.5, 1, 4, 2.0))
    seen: list[object] = []

    async def watch() -> None:
        async for event in bus.follow("s"):
            seen.append(event.body)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)
    bus.publish("s", TrialProgress(0, 1.0, 2, 4, 1.5))
    bus.publish("s", _finished("s"))
    await asyncio.wait_for(task, 1)
    assert [type(b).__name__ for b in seen] == ["TrialProgress", "TrialProgress", "StudyFinished"]


async def test_memory_is_bounded_per_study_and_freed_after_the_study_ends() -> None:
    bus = EventBus(max_events=10, retain_seconds=0.05)
    for step in range(1_000):
        bus.publish("long", TrialProgress(0, step / 100, step, 1_000, 1.0))
    assert bus.size() == 10  # the most recent only
    bus.publish("long", _finished("long"))
    assert bus.has_events("long")
    await asyncio.sleep(0.1)
    assert not bus.has_events("long") and bus.size() == 0


def test_the_excluded_note_says_what_the_objective_does_with_each_class() -> None:
    from services.optimizer.core.views import excluded_note

    assert excluded_note([]) == ""
    scored = excluded_note([{"label": "rare", "train_rows": 2, "validation_rows": 1}])
    assert scored.startswith("1 class not trained on")
    assert "rare (2 train / 1 validation rows)" in scored
    assert "Their 1 validation rows stay in the evaluation" in scored
    unseen = excluded_note(
        [
            {"label": "a", "train_rows": 2, "validation_rows": 0},
            {"label": "b", "train_rows": 1, "validation_rows": 0},
        ]
    )
    assert unseen.startswith("2 classes not trained on")
    assert unseen.endswith("They have no validation rows, so the evaluation does not score them.")


async def test_the_stream_keeps_evaluations_without_what_grows_with_the_classes() -> None:
    from services.optimizer.core.events import TrialEvaluated
    from services.optimizer.core.ports import Evaluation

    document = {
        "objective": 0.8,
        "classification": {
            "f1Macro": 0.8,
            "worstClasses": ["a"],
            "perClass": [{"label": "a", "f1": 0.8}] * 300,
            "confusionMatrix": {"labels": ["a"] * 300, "counts": [1] * 90_000},
        },
    }
    evaluation = Evaluation(0.8, "f1_macro", {"f1_macro": 0.8}, document)
    bus = EventBus()
    bus.publish("s", TrialEvaluated(1, 1.0, evaluation))
    bus.publish("s", _finished("s"))
    events = [event async for event in bus.follow("s")]
    kept = events[0].body
    assert isinstance(kept, TrialEvaluated)
    assert kept.evaluation.document["classification"] == {"f1Macro": 0.8, "worstClasses": ["a"]}
    assert kept.evaluation.objective == 0.8 and kept.evaluation.figures == {"f1_macro": 0.8}
    assert "perClass" in document["classification"]  # the caller's document untouched
