"""The forward agent's read-ahead batches (fair share needs the agent to keep up with admission):
the next batch gathers while one is processed, batches stay in order and bounded, errors surface."""

from __future__ import annotations

import asyncio

import pytest

from streams.agents.readahead import ReadAhead
from tests.support.wait import wait_for


class Recorder:
    """A ``process`` callback that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()

    async def __call__(self, batch: list[int]) -> None:
        self.batches.append(batch)
        self.entered.set()
        await self.release.wait()

    def hold(self) -> None:
        self.release.clear()
        self.entered.clear()


async def test_first_batch_gathers_within_the_window() -> None:
    seen = Recorder()
    ahead = ReadAhead(seen, max_size=10, within_s=0.05)
    for i in range(3):
        await ahead.add(i)
    await wait_for(lambda: seen.batches, timeout=5, what="a batch")
    assert seen.batches == [[0, 1, 2]]


async def test_next_batch_gathers_while_one_is_processed_and_starts_without_the_window() -> None:
    seen = Recorder()
    # A window far longer than the test: a batch that gathered behind another must not wait for it.
    ahead = ReadAhead(seen, max_size=100, within_s=60)
    seen.hold()
    for i in range(100):  # a full batch starts at once
        await ahead.add(i)
    await asyncio.wait_for(seen.entered.wait(), 5)
    for i in range(100, 130):
        await ahead.add(i)
    assert ahead.pending == 30
    seen.release.set()
    await wait_for(lambda: len(seen.batches) == 2, timeout=5, what="the read-ahead batch")
    assert seen.batches == [list(range(100)), list(range(100, 130))]
    await ahead.stop()


async def test_add_waits_while_a_full_batch_waits_behind_one_in_flight() -> None:
    seen = Recorder()
    ahead = ReadAhead(seen, max_size=4, within_s=0)
    seen.hold()
    await ahead.add(0)
    await asyncio.wait_for(seen.entered.wait(), 5)
    for i in range(1, 5):
        await ahead.add(i)  # the next batch, full
    blocked = asyncio.ensure_future(ahead.add(5))
    await asyncio.sleep(0)
    assert not blocked.done() and ahead.pending == 4
    seen.release.set()
    await asyncio.wait_for(blocked, 5)
    await wait_for(lambda: sum(map(len, seen.batches)) == 6, timeout=5, what="every item")
    assert seen.batches == [[0], [1, 2, 3, 4], [5]]


async def test_idle_then_busy_again() -> None:
    seen = Recorder()
    ahead = ReadAhead(seen, max_size=10, within_s=0)
    await ahead.add(1)
    await wait_for(lambda: seen.batches == [[1]], timeout=5, what="the first batch")
    await wait_for(lambda: ahead._task is None, timeout=5, what="idle")
    await ahead.add(2)
    await wait_for(lambda: seen.batches == [[1], [2]], timeout=5, what="a batch after idling")


async def test_a_failed_batch_is_raised_by_the_next_add_and_nothing_after_it_runs() -> None:
    batches: list[list[int]] = []

    async def process(batch: list[int]) -> None:
        batches.append(batch)
        raise RuntimeError("boom")

    ahead = ReadAhead(process, max_size=2, within_s=0)
    await ahead.add(0)
    await wait_for(
        lambda: ahead._task is not None and ahead._task.done(), timeout=5, what="the failure"
    )
    with pytest.raises(RuntimeError, match="boom"):
        await ahead.add(1)
    with pytest.raises(RuntimeError, match="boom"):
        await ahead.add(2)
    assert batches == [[0]]


async def test_stop_cancels_the_batch_in_flight() -> None:
    seen = Recorder()
    ahead = ReadAhead(seen, max_size=1, within_s=0)
    seen.hold()
    await ahead.add(0)
    await asyncio.wait_for(seen.entered.wait(), 5)
    await ahead.add(1)
    await asyncio.wait_for(ahead.stop(), 5)
    assert seen.batches == [[0]] and ahead.pending == 0
