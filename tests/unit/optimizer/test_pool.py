"""The trainer pool: leases, a trainer free at its job's end, waiters woken, marks in order."""

from __future__ import annotations

import asyncio
import time

from services.optimizer.core.pool import TrainerPool
from services.optimizer.core.ports import TrainerState

ADDRESSES = ["t1:1", "t2:1", "t3:1"]


class Discovery:
    """A fixed list of trainers that records the deletion-cost marks it is asked for."""

    def __init__(self, addresses: list[str], mark_seconds: float = 0.0) -> None:
        self.list = addresses
        self.marks: list[tuple[str, bool]] = []
        self.mark_seconds = mark_seconds

    async def addresses(self) -> list[str]:
        return list(self.list)

    async def mark(self, address: str, busy: bool) -> None:
        await asyncio.sleep(self.mark_seconds)
        self.marks.append((address, busy))


class Trainers:
    """Each status call takes `delay` seconds; `busy` run another client's job."""

    def __init__(self, delay: float = 0.0, busy: frozenset[str] = frozenset()) -> None:
        self.delay, self.busy = delay, busy
        self.calls = 0

    async def status(self, address: str) -> TrainerState | None:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return TrainerState(busy=address in self.busy)


def _pool(trainers: Trainers | None = None, discovery: Discovery | None = None) -> TrainerPool:
    return TrainerPool(discovery or Discovery(ADDRESSES), trainers or Trainers())  # type: ignore[arg-type]


async def test_a_late_release_does_not_free_a_trainer_handed_out_again() -> None:
    pool = _pool(discovery=Discovery(["t1:1"]))
    first = await pool.acquire()
    assert first == "t1:1"
    lease = pool.lease(first)
    assert await pool.acquire() is None  # held
    pool.job_ended(first)  # the job's end arrives: free now, before the trial is recorded
    again = await pool.acquire()
    assert again == "t1:1" and pool.lease(again) != lease
    pool.release(first, lease)  # the first trial's handling ends later: nothing to free
    assert await pool.acquire() is None
    pool.release(again, pool.lease(again))
    assert await pool.acquire() == "t1:1"


async def test_a_freed_trainer_wakes_every_waiting_study_at_once() -> None:
    pool = _pool(discovery=Discovery(["t1:1"]))
    held = await pool.acquire()
    assert held is not None
    woken: list[float] = []

    async def study() -> None:
        await pool.changed()
        woken.append(time.monotonic())

    waiters = [asyncio.create_task(study()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not woken
    freed_at = time.monotonic()
    pool.job_ended(held)
    await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    assert len(woken) == 3 and max(woken) - freed_at < 0.5  # at once, not at a poll
    # The next wait waits for the next trainer freed, not the last one.
    late = asyncio.create_task(pool.changed())
    await asyncio.sleep(0.02)
    assert not late.done()
    late.cancel()


async def test_the_trainers_are_asked_their_status_at_once() -> None:
    addresses = [f"t{i}:1" for i in range(16)]
    trainers = Trainers(delay=0.1)
    pool = _pool(trainers, Discovery(addresses))
    started = time.monotonic()
    assert await pool.acquire() == "t0:1"
    assert time.monotonic() - started < 0.1 * 8  # not 16 calls one after another (1.6 s)
    assert trainers.calls == 16
    # The trainers it holds are not asked again.
    await pool.acquire()
    assert trainers.calls == 16 + 15


async def test_marks_of_one_trainer_are_applied_in_the_order_asked() -> None:
    # The job ends (idle) and the trainer is handed out again (busy) at once: however slow
    # the API server, the pod ends marked busy.
    discovery = Discovery(["t1:1"], mark_seconds=0.02)
    pool = _pool(discovery=discovery)
    held = await pool.acquire()
    assert held is not None
    pool.job_ended(held)
    assert await pool.acquire() == held
    await asyncio.sleep(0.1)
    assert discovery.marks[-1] == (held, True)
    pool.release(held, pool.lease(held))
    await asyncio.sleep(0.1)
    assert discovery.marks[-1] == (held, False)


async def test_busy_and_unreachable_trainers_are_counted_not_handed_out() -> None:
    pool = _pool(Trainers(busy=frozenset({"t1:1"})))
    assert await pool.acquire() == "t2:1"
    assert await pool.acquire() == "t3:1"
    assert await pool.acquire() is None
    assert pool.waiting_reason() == "waiting for a trainer: 3 ready, all busy"
    assert await pool.reachable() == 3
