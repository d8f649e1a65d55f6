"""The fair gate's order: priority first, then round robin over users, FIFO per user; cancel and close."""

from __future__ import annotations

import asyncio

import pytest

from workers.fairshare import FairGate, GateClosed


async def started_order(gate: FairGate, jobs: list[tuple[str, str]]) -> list[int]:
    """Queue ``jobs`` (user, priority) behind a held gate, then release it: the indexes in start order."""
    order: list[int] = []

    async def job(i: int, user: str, priority: str) -> None:
        await gate.enter(user, priority)
        order.append(i)
        await asyncio.sleep(0)  # hold the slot over one tick, as real work would
        gate.leave()

    assert gate.try_enter()  # the gate is busy while the backlog arrives
    tasks = [asyncio.create_task(job(i, u, p)) for i, (u, p) in enumerate(jobs)]
    await asyncio.sleep(0)
    assert gate.waiting == len(jobs)
    gate.leave()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    return order


async def test_a_burst_user_does_not_starve_the_others() -> None:
    jobs = [("burst", "normal")] * 10 + [("a", "normal"), ("a", "normal"), ("b", "normal")]
    order = await started_order(FairGate(1), jobs)
    # burst, a, b take turns: a's and b's jobs start within the first rounds, not after the burst.
    assert order[:6] == [0, 10, 12, 1, 11, 2]
    assert order[6:] == [3, 4, 5, 6, 7, 8, 9]  # then the burst alone, in its own order


async def test_priority_comes_before_fairness() -> None:
    jobs = [("burst", "high")] * 3 + [("a", "normal"), ("b", "low"), ("a", "high")]
    order = await started_order(FairGate(1), jobs)
    assert order == [0, 5, 1, 2, 3, 4]


async def test_uncontended_entries_do_not_wait() -> None:
    gate = FairGate(2)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    await asyncio.wait_for(gate.enter("u", "normal"), 1)
    assert gate.active == 2 and gate.waiting == 0


async def test_a_cancelled_waiter_leaves_no_trace_and_a_granted_one_passes_its_slot_on() -> None:
    gate = FairGate(1)
    assert gate.try_enter()
    first = asyncio.create_task(gate.enter("a", "normal"))
    second = asyncio.create_task(gate.enter("b", "normal"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert gate.waiting == 1
    gate.leave()  # granted to b
    await asyncio.wait_for(second, 1)
    assert gate.active == 1 and gate.waiting == 0

    third = asyncio.create_task(gate.enter("c", "normal"))
    await asyncio.sleep(0)
    gate.leave()  # granted to c, which is cancelled before it resumes
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert gate.active == 0 and gate.try_enter()


async def test_close_fails_the_waiters_and_refuses_new_entries() -> None:
    gate = FairGate(1)
    assert gate.try_enter()
    waiter = asyncio.create_task(gate.enter("a", "low"))
    await asyncio.sleep(0)
    gate.close()
    with pytest.raises(GateClosed):
        await waiter
    with pytest.raises(GateClosed):
        gate.try_enter()
    assert gate.waiting == 0

