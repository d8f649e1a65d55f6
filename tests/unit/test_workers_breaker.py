"""Circuit breaker state machine (fake clock), and an open breaker as a bounded pause of an endpoint call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferstream import clock
from inferstream.routes import routes_from_settings
from inferstream.settings import Settings
from workers.breaker import CircuitBreaker
from workers.endpoint import DeadlinePassed, Endpoint, RetryBudgetSpent
from workers.retry import RetryBudget


class FakeClock:
    """A clock the test moves; ``read_by(n)`` waits until it has been read ``n`` times in all.

    An open breaker's ``acquire`` reads the clock to work out how long to wait, then waits
    without another ``await`` in between: once a waiter has read it, it is parked.
    """

    def __init__(self) -> None:
        self.t = 0.0
        self.reads = 0
        self._read = asyncio.Condition()

    def __call__(self) -> float:
        self.reads += 1
        asyncio.get_running_loop().create_task(self._notify())
        return self.t

    async def _notify(self) -> None:
        async with self._read:
            self._read.notify_all()

    async def read_by(self, n: int) -> None:
        async with self._read:
            await asyncio.wait_for(self._read.wait_for(lambda: self.reads >= n), 5)


async def test_opens_after_threshold_and_probes_half_open() -> None:
    clock, changes = FakeClock(), []
    b = CircuitBreaker("ep", 3, 5.0, clock=clock, on_change=lambda n, o, s: changes.append((o, s)))
    for _ in range(2):
        assert await b.acquire() is False
        b.on_failure(False)
    assert b.state == "closed"
    b.on_failure(False)
    assert b.state == "open"
    reads = clock.reads
    first, second = asyncio.ensure_future(b.acquire()), asyncio.ensure_future(b.acquire())
    await clock.read_by(reads + 4)  # each waiter read it twice (state, then its wait): both parked while open
    assert not first.done() and not second.done()
    clock.t = 5.0
    assert b.state == "half_open"  # wakes both; one becomes the probe, the other waits again
    done, _ = await asyncio.wait({first, second}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and done.pop().result() is True  # the probe
    other = second if first.done() else first
    assert not other.done(), "only one probe while half-open"
    b.on_success(True)
    assert b.state == "closed"
    assert await asyncio.wait_for(other, 1) is False
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
    reads = clock.reads
    probe, other = asyncio.ensure_future(b.acquire()), asyncio.ensure_future(b.acquire())
    await clock.read_by(reads + 4)  # both parked while open
    clock.t = 1.0
    assert b.state == "half_open"  # wakes both
    done, _ = await asyncio.wait({probe, other}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result() for t in done] == [True]
    waiting = other if probe in done else probe
    assert not waiting.done()
    b.release(True)  # the probe's call was cancelled: the waiting caller probes instead
    assert await asyncio.wait_for(waiting, 1) is True


async def test_late_success_of_a_non_probe_does_not_close_an_open_breaker() -> None:
    b = CircuitBreaker("ep", 1, 10.0, clock=FakeClock())
    b.on_failure(False)
    b.on_success(False)
    assert b.state == "open"


# ---- the breaker as a pause inside an endpoint call -------------------------


def _endpoint(settings: Settings) -> Endpoint:
    route = routes_from_settings(settings).get("generate", "sim-gpt")
    assert route is not None
    return Endpoint(settings, route)


def _breaker(endpoint: Endpoint) -> CircuitBreaker:
    (upstream,) = endpoint.pool.upstreams  # the shorthand: one backend per route
    return upstream.breaker


def _open_endpoint(reset_s: float) -> Endpoint:
    endpoint = _endpoint(Settings(ml_breaker_threshold=1, ml_breaker_reset_s=reset_s))
    _breaker(endpoint).on_failure(False)
    assert _breaker(endpoint).state == "open"
    return endpoint


async def _never_called(upstream: Any) -> str:
    raise AssertionError("no call may go out while the breaker is open")


async def test_an_open_breaker_pauses_a_call_until_its_budget_ends_then_gives_up() -> None:
    endpoint = _open_endpoint(reset_s=60)
    budget = RetryBudget(0.3)
    started = clock.now()
    budget.start(started)  # an earlier attempt's call started it
    with pytest.raises(RetryBudgetSpent) as spent:
        await endpoint.call(_never_called, deadline_at=None, budget=budget)
    waited = clock.now() - started
    assert 0.25 <= waited < 2.0, waited  # it waited for the breaker, then gave up at the budget's end
    assert "circuit breaker" in spent.value.waiting_for
    assert endpoint.slots._value == endpoint.settings.ml_concurrency  # the call slot was given back


async def test_a_deadline_before_the_budget_expires_the_paused_call() -> None:
    endpoint = _open_endpoint(reset_s=60)
    with pytest.raises(DeadlinePassed):
        budget = RetryBudget(30)
        budget.start(clock.now())
        await endpoint.call(_never_called, deadline_at=clock.now() + 0.1, budget=budget)


async def test_a_paused_call_goes_out_when_the_breaker_half_opens_within_the_budget() -> None:
    endpoint = _open_endpoint(reset_s=0.2)

    async def answer(upstream: Any) -> str:
        return "ok"

    budget = RetryBudget(10)
    assert await endpoint.call(answer, budget=budget) == ("ok", "default")
    assert _breaker(endpoint).state == "closed"  # it was the probe, and its success closed the breaker
    assert budget.started_at is not None and budget.started_at - clock.now() < 0.1  # the call started it


async def test_the_budget_starts_at_the_first_call_not_while_waiting_for_a_slot() -> None:
    """A prefetched message queued behind a backlog keeps its whole budget for its own calls."""
    endpoint = _endpoint(Settings(ml_concurrency=1))
    called, release = asyncio.Event(), asyncio.Event()

    async def slow(upstream: Any) -> str:
        called.set()
        await release.wait()
        return "first"

    async def quick(upstream: Any) -> str:
        return "second"

    first = asyncio.ensure_future(endpoint.call(slow))
    await asyncio.wait_for(called.wait(), 5)  # the first holds the only slot
    budget = RetryBudget(0.1)  # shorter than its wait for the only slot
    second = asyncio.ensure_future(endpoint.call(quick, budget=budget))
    done, _ = await asyncio.wait({second}, timeout=0.3)  # three budgets' time waiting for the slot
    assert not done and budget.started_at is None
    release.set()
    assert await first == ("first", "default") and await second == ("second", "default")
    assert budget.started_at is not None
