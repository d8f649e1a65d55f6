"""Circuit breaker state machine, with a fake clock."""

from __future__ import annotations

import asyncio

from workers.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_opens_after_threshold_and_probes_half_open() -> None:
    clock, changes = FakeClock(), []
    b = CircuitBreaker("ep", 3, 5.0, clock=clock, on_change=lambda n, o, s: changes.append((o, s)))
    for _ in range(2):
        assert await b.acquire() is False
        b.on_failure(False)
    assert b.state == "closed"
    b.on_failure(False)
    assert b.state == "open"
    waiter = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    clock.t = 5.0
    assert b.state == "half_open"
    assert await asyncio.wait_for(waiter, 1) is True  # the probe
    second = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(0.01)
    assert not second.done(), "only one probe while half-open"
    b.on_success(True)
    assert b.state == "closed"
    assert await asyncio.wait_for(second, 1) is False
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_failed_probe_reopens_for_another_period() -> None:
    clock = FakeClock()
    b = CircuitBreaker("ep", 1, 2.0, clock=clock)
    b.on_failure(False)
    clock.t = 2.0
    assert await b.acquire() is True
    clock.t = 3.0
    b.on_failure(True)
    assert b.state == "open"
    clock.t = 4.9
    assert b.state == "open"
    clock.t = 5.0
    assert b.state == "half_open"


async def test_success_resets_the_count_and_cancelled_probe_frees_the_slot() -> None:
    clock = FakeClock()
    b = CircuitBreaker("ep", 2, 1.0, clock=clock)
    b.on_failure(False)
    b.on_success(False)
    b.on_failure(False)
    assert b.state == "closed"
    b.on_failure(False)
    clock.t = 1.0
    assert await b.acquire() is True
    other = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(0.01)
    b.release(True)
    assert await asyncio.wait_for(other, 1) is True


async def test_late_success_of_a_non_probe_does_not_close_an_open_breaker() -> None:
    b = CircuitBreaker("ep", 1, 10.0, clock=FakeClock())
    b.on_failure(False)
    b.on_success(False)
    assert b.state == "open"
