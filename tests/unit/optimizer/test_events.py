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
