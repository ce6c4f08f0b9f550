"""A study's events for the clients that watch it: domain events on a bounded bus."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.optimizer.core.ports import Evaluation
from services.optimizer.core.views import StudyView, TrialView


@dataclass(frozen=True)
class TrialStarted:
    """A trial was dispatched to a trainer."""

    trial: TrialView


@dataclass(frozen=True)
class TrialProgress:
    """A trial's training progressed."""

    number: int
    epoch: float
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class TrialEvaluated:
    """A trial's epoch was scored."""

    number: int
    epoch: float
    evaluation: Evaluation
    # Attempts at this evaluation refused as UNAVAILABLE before it was scored, the last's reason.
    refusals: int = 0
    last_refusal: str = ""


@dataclass(frozen=True)
class TrialFinished:
    """A trial ended (complete, pruned or failed)."""

    trial: TrialView


@dataclass(frozen=True)
class StudyFinished:
    """The study ended; the last event of its stream."""

    study: StudyView


@dataclass(frozen=True)
class StudyWaiting:
    """The study waits for a trainer: none of its trials runs and none can start."""

    reason: str
    since: float  # epoch seconds


StudyEventBody = (
    TrialStarted | TrialProgress | TrialEvaluated | TrialFinished | StudyFinished | StudyWaiting
)


@dataclass(frozen=True)
class StudyEvent:
    """One event of a study's stream."""

    study_id: str
    body: StudyEventBody
    time: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class _Channel:
    events: deque[tuple[int, StudyEvent]]
    waiters: set[asyncio.Event] = field(default_factory=set)
    sequence: int = 0
    finished: bool = False


class EventBus:
    """Each active study's recent events (at most `max_events`), replayed to a new watcher
    and then followed live. A finished study's events are dropped `retain_seconds` after it
    finishes (a later watcher gets its final state from storage): memory stays bounded
    however long the process lives."""

    def __init__(self, max_events: int = 2000, retain_seconds: float = 60.0) -> None:
        self._max_events = max_events
        self._retain_seconds = retain_seconds
        self._channels: dict[str, _Channel] = {}

    def _channel(self, study_id: str) -> _Channel:
        channel = self._channels.get(study_id)
        if channel is None:
            channel = _Channel(events=deque(maxlen=self._max_events))
            self._channels[study_id] = channel
        return channel

    def publish(self, study_id: str, body: StudyEventBody) -> None:
        """Adds an event (its evaluations in the basic view) and wakes the study's watchers."""
        channel = self._channel(study_id)
        channel.sequence += 1
        channel.events.append((channel.sequence, StudyEvent(study_id, lean_body(body))))
        for waiter in channel.waiters:
            waiter.set()
        if isinstance(body, StudyFinished) and not channel.finished:
            channel.finished = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._channels.pop(study_id, None)
                return
            loop.call_later(self._retain_seconds, self._drop, study_id, channel)

    def _drop(self, study_id: str, channel: _Channel) -> None:
        if self._channels.get(study_id) is channel:
            del self._channels[study_id]

    def has_events(self, study_id: str) -> bool:
        """Whether the study has events in memory."""
        channel = self._channels.get(study_id)
        return channel is not None and bool(channel.events)

    def size(self) -> int:
        """Events held for all studies (for tests and metrics)."""
        return sum(len(c.events) for c in self._channels.values())

    async def follow(self, study_id: str) -> AsyncIterator[StudyEvent]:
        """The study's events in memory, then live, until its StudyFinished."""
        channel = self._channel(study_id)
        waiter = asyncio.Event()
        channel.waiters.add(waiter)
        try:
            sent = 0
            while True:
                waiter.clear()
                for sequence, event in list(channel.events):
                    if sequence <= sent:
                        continue
                    sent = sequence
                    yield event
                    if isinstance(event.body, StudyFinished):
                        return
                await waiter.wait()
        finally:
            channel.waiters.discard(waiter)


def lean_document(document: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """An evaluation document without what grows with the classes: a classification's
    per-class metrics and confusion matrix (TRIAL_VIEW_BASIC)."""
    if document is None:
        return None
    classification = document.get("classification")
    if not isinstance(classification, Mapping):
        return document
    heavy = ("perClass", "per_class", "confusionMatrix", "confusion_matrix")
    if not any(key in classification for key in heavy):
        return document
    kept = {k: v for k, v in classification.items() if k not in heavy}
    return {**document, "classification": kept}


def _lean_trial(trial: TrialView | None) -> TrialView | None:
    if trial is None or trial.evaluation is None:
        return trial
    return replace(trial, evaluation=lean_document(trial.evaluation))


def lean_body(body: StudyEventBody) -> StudyEventBody:
    """The event as the stream keeps and sends it: evaluations in the basic view. A study's
    stream keeps up to `max_events` events while it runs; with whole 300-class evaluations
    (a confusion matrix of 90,000 counts each) they held hundreds of MB, and watchers need
    the figures, not the matrices (ListTrials has them)."""
    if isinstance(body, TrialEvaluated):
        document = lean_document(body.evaluation.document)
        if document is body.evaluation.document:
            return body
        return replace(body, evaluation=replace(body.evaluation, document=document or {}))
    if isinstance(body, TrialStarted | TrialFinished):
        return replace(body, trial=_lean_trial(body.trial))  # type: ignore[arg-type]
    if isinstance(body, StudyFinished) and body.study.best_trial is not None:
        best = _lean_trial(body.study.best_trial)
        return replace(body, study=replace(body.study, best_trial=best))
    return body
