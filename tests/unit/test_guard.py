"""The agent guard: a failed batch is retried until done, its offsets held meanwhile; cancellation is never retried."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from inferstream.retrying import AGENT_BATCH
from streams.agents import guard
from streams.agents.guard import until_done
from tests.support.wait import wait_for


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # The policy's shape is tested in test_retrying.py; here only what the guard does with it.
    monkeypatch.setattr(guard, "AGENT_BATCH", AGENT_BATCH.tuned(0.001, 0.002))


def stalls(agent: str) -> float:
    return (
        REGISTRY.get_sample_value("inferstream_agent_batch_failures_total", {"agent": agent}) or 0.0
    )


class Batch:
    """Fails with each of ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


async def test_a_failing_batch_is_retried_whatever_the_error_and_each_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = stalls("guard-a")
    batch = Batch(KeyError("table"), RuntimeError("bug"), OSError("down"))
    with caplog.at_level(logging.ERROR, logger=guard.__name__):
        await until_done("guard-a", batch)
    assert batch.calls == 4
    assert stalls("guard-a") - before == 3
    failures = [r for r in caplog.records if "retrying, offsets held" in r.getMessage()]
    assert [r.exc_info[1].__class__ for r in failures if r.exc_info] == [
        KeyError,
        RuntimeError,
        OSError,
    ]
    assert [f"(attempt {n})" in r.getMessage() for n, r in enumerate(failures, 1)] == [True] * 3


async def test_a_batch_that_works_at_once_is_run_once() -> None:
    before = stalls("guard-b")
    batch = Batch()
    await until_done("guard-b", batch)
    assert batch.calls == 1 and stalls("guard-b") == before


async def test_the_next_batch_waits_while_one_fails_so_its_offsets_are_not_acked() -> None:
    healthy = asyncio.Event()
    done: list[int] = []
    calls: dict[int, int] = {}

    async def process(n: int) -> None:
        calls[n] = calls.get(n, 0) + 1
        if n == 1 and not healthy.is_set():
            raise ConnectionError("still down")

    async def agent() -> None:  # what an agent does: guard each batch, then Faust acks it
        for n in range(3):
            await until_done("guard-c", lambda n=n: process(n))
            done.append(n)

    task = asyncio.create_task(agent())
    try:
        await wait_for(lambda: calls.get(1, 0) >= 5, timeout=10, what="batch 1 retried")
        assert done == [0] and 2 not in calls and not task.done()
        healthy.set()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert done == [0, 1, 2] and calls[2] == 1


async def test_cancelling_a_stalled_agent_stops_the_retries() -> None:
    batch = Batch(*[ConnectionError("down")] * 10_000)
    task = asyncio.create_task(until_done("guard-d", batch))
    await wait_for(lambda: batch.calls >= 2, timeout=10, what="a retry")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()  # the loop ended with the task: nothing retries the batch any more


async def test_a_cancellation_raised_by_the_batch_is_not_retried() -> None:
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await until_done("guard-e", cancelled)
    assert calls == 1
