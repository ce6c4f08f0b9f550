"""The trainer pool: which trainers are idle, and which of them this optimizer holds."""

from __future__ import annotations

import asyncio

from services.optimizer import metrics
from services.optimizer.core.ports import TrainerDiscovery, TrainerPort


class TrainerPool:
    """Hands out idle trainers: reachable, not stopping, not busy, not already running ours."""

    def __init__(self, discovery: TrainerDiscovery, trainers: TrainerPort) -> None:
        self._discovery = discovery
        self._trainers = trainers
        self._in_use: set[str] = set()
        self._lock = asyncio.Lock()
        # What the last look at the pool found (the loratune_optimizer_trainers gauge).
        self._counts = {"idle": 0, "busy": 0, "unreachable": 0}
        self._marking: set[asyncio.Future[None]] = set()

    async def acquire(self) -> str | None:
        """An idle trainer's address, now marked in use; None when there is none."""
        async with self._lock:
            addresses = await self._discovery.addresses()
            idle = busy = unreachable = 0
            chosen = None
            marks: dict[str, bool] = {}
            for address in addresses:
                if address in self._in_use:  # marked when handed out, idle when its job ends
                    busy += 1
                    continue
                state = await self._trainers.status(address)
                if state is None or state.shutting_down:
                    unreachable += 1
                elif state.busy:
                    busy += 1
                    marks[address] = True
                else:
                    idle += 1
                    marks[address] = False
                    if chosen is None:
                        chosen = address
            if chosen is not None:
                self._in_use.add(chosen)
                marks[chosen] = True
                idle -= 1
                busy += 1
            self._counts = {"idle": idle, "busy": busy, "unreachable": unreachable}
            self._publish()
            # Before the job starts: a scale-in from now on spares the chosen trainer.
            for address, is_busy in marks.items():
                await self._discovery.mark(address, is_busy)
            return chosen

    def claim(self, address: str) -> None:
        """Marks a trainer in use (a reattached trial after a restart)."""
        self._in_use.add(address)

    def job_ended(self, address: str) -> None:
        """The trainer's job ended: its pod is marked idle now, while the optimizer still
        records the trial (the trainer is released after)."""
        task = asyncio.ensure_future(self._discovery.mark(address, False))
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    def release(self, address: str) -> None:
        """The trainer is free again (the gauges say so until the next look at the pool, its
        pod's deletion cost at once)."""
        if address in self._in_use:
            self.job_ended(address)
            self._in_use.discard(address)
            if self._counts["busy"] > 0:
                self._counts["busy"] -= 1
                self._counts["idle"] += 1
                self._publish()

    def waiting_reason(self) -> str:
        """Why no trainer could be had at the last look at the pool, in words."""
        ready = self._counts["idle"] + self._counts["busy"]
        reason = f"waiting for a trainer: {ready} ready"
        if ready:
            reason += ", all busy"
        if self._counts["unreachable"]:
            reason += f", {self._counts['unreachable']} not answering"
        return reason

    def _publish(self) -> None:
        for state, count in self._counts.items():
            metrics.TRAINERS.labels(state=state).set(count)

    async def reachable(self) -> int:
        """How many trainers answer."""
        count = 0
        for address in await self._discovery.addresses():
            if await self._trainers.status(address) is not None:
                count += 1
        return count
