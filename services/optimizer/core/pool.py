"""The trainer pool: which trainers are idle, and which of them this optimizer holds.

A trainer is held from the moment it is handed out until its job ends. It is free again
when the trainer sends the job's end (`job_ended`), not when the optimizer has finished
recording the trial (the last epoch's evaluation can take a second while the trainer sits
idle), and every study waiting for a trainer is woken at once (`changed`), not at its next
poll. Each hand-out is a numbered lease, so the late release of a trial whose trainer was
already handed out again frees nothing.
"""

from __future__ import annotations

import asyncio
import itertools

from services.optimizer import metrics
from services.optimizer.core.ports import TrainerDiscovery, TrainerPort


class TrainerPool:
    """Hands out idle trainers: reachable, not stopping, not busy, not already running ours."""

    def __init__(self, discovery: TrainerDiscovery, trainers: TrainerPort) -> None:
        self._discovery = discovery
        self._trainers = trainers
        self._in_use: dict[str, int] = {}  # address -> the lease it is held under
        self._leases = itertools.count(1)
        self._lock = asyncio.Lock()
        # What the last look at the pool found (the loratune_optimizer_trainers gauge).
        self._counts = {"idle": 0, "busy": 0, "unreachable": 0}
        # Pod deletion costs: the latest wanted per address, applied in order by one task.
        self._wanted_marks: dict[str, bool] = {}
        self._marking: dict[str, asyncio.Task[None]] = {}
        self._freed = asyncio.Event()

    async def acquire(self) -> str | None:
        """An idle trainer's address, now held (`lease`); None when there is none. The
        trainers not held are asked their status all at once."""
        async with self._lock:
            addresses = await self._discovery.addresses()
            held = [a for a in addresses if a in self._in_use]
            free = [a for a in addresses if a not in self._in_use]
            states = await asyncio.gather(*(self._trainers.status(a) for a in free))
            idle = busy = unreachable = 0
            busy = len(held)  # marked when handed out, idle when its job ends
            chosen = None
            marks: dict[str, bool] = {}
            for address, state in zip(free, states, strict=True):
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
                self._in_use[chosen] = next(self._leases)
                marks[chosen] = True
                idle -= 1
                busy += 1
            self._counts = {"idle": idle, "busy": busy, "unreachable": unreachable}
            self._publish()
            # Before the job starts: a scale-in from now on spares the chosen trainer.
            await asyncio.gather(*(self._mark(a, is_busy) for a, is_busy in marks.items()))
            return chosen

    def lease(self, address: str) -> int:
        """The lease `address` is held under now (0 when it is not held)."""
        return self._in_use.get(address, 0)

    def claim(self, address: str) -> None:
        """Holds a trainer (a reattached trial after a restart)."""
        self._in_use[address] = next(self._leases)

    def job_ended(self, address: str) -> None:
        """The trainer's job ended: the trainer is free for the next trial now, and its pod
        marked idle, while the optimizer still records the trial."""
        self._free(address, self._in_use.get(address))

    def release(self, address: str, lease: int | None = None) -> None:
        """The trial on `address` is over: frees the trainer if it is still held under
        `lease` (any lease when None); a trainer handed out again since is left alone."""
        if lease is None or self._in_use.get(address) == lease:
            self._free(address, self._in_use.get(address))

    async def changed(self) -> None:
        """Returns when a trainer is next freed (a study waiting for one tries again)."""
        await self._freed.wait()

    def waiting_reason(self) -> str:
        """Why no trainer could be had at the last look at the pool, in words."""
        ready = self._counts["idle"] + self._counts["busy"]
        reason = f"waiting for a trainer: {ready} ready"
        if ready:
            reason += ", all busy"
        if self._counts["unreachable"]:
            reason += f", {self._counts['unreachable']} not answering"
        return reason

    async def reachable(self) -> int:
        """How many trainers answer."""
        addresses = await self._discovery.addresses()
        states = await asyncio.gather(*(self._trainers.status(a) for a in addresses))
        return sum(1 for state in states if state is not None)

    # ---- internals ---------------------------------------------------------------------

    def _free(self, address: str, lease: int | None) -> None:
        if lease is None:
            return
        del self._in_use[address]
        self._mark(address, False)
        if self._counts["busy"] > 0:
            self._counts["busy"] -= 1
            self._counts["idle"] += 1
            self._publish()
        self._freed.set()  # wakes every waiter, and a fresh event for the next ones
        self._freed = asyncio.Event()

    def _mark(self, address: str, busy: bool) -> asyncio.Task[None]:
        """Asks for the pod's deletion cost of `busy`; the marks of one address are applied
        in the order asked, the last one winning."""
        self._wanted_marks[address] = busy
        task = self._marking.get(address)
        if task is None or task.done():
            task = asyncio.ensure_future(self._apply_marks(address))
            self._marking[address] = task
        return task

    async def _apply_marks(self, address: str) -> None:
        while True:
            busy = self._wanted_marks[address]
            await self._discovery.mark(address, busy)
            if self._wanted_marks.get(address) == busy:
                # Nothing newer asked: forget the address (pods come and go).
                del self._wanted_marks[address]
                del self._marking[address]
                return

    def _publish(self) -> None:
        for state, count in self._counts.items():
            metrics.TRAINERS.labels(state=state).set(count)
