"""read_ahead, the agent loop of the forward, settle and sink agents: the stream's own acks are off,
each event is acked only after its batch's work returned, in log order, the next batch gathers
while one is processed, and a failing batch keeps its offsets until it succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import faust
from faust.types import EventT

from streams.agents.readahead import ReadAhead, read_ahead
from tests.support.wait import wait_for


@dataclass(frozen=True)
class Event:
    offset: int


class FakeStream:
    """What read_ahead uses of a Faust stream: ``enable_acks``, ``events()`` and ``ack``."""

    def __init__(self) -> None:
        self.enable_acks = True
        self.acked: list[int] = []
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()

    def put(self, *offsets: int) -> None:
        for offset in offsets:
            self._queue.put_nowait(Event(offset))

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def ack(self, event: Event) -> bool:
        self.acked.append(event.offset)
        return True


class Work:
    """Records each batch's offsets (and what was acked when it started); holds until released."""

    def __init__(self, stream: FakeStream, fail_first: int = 0) -> None:
        self.stream = stream
        self.batches: list[list[int]] = []
        self.acked_at_start: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_first = fail_first

    async def __call__(self, events: list[EventT]) -> None:
        offsets = [cast(Event, e).offset for e in events]
        self.batches.append(offsets)
        self.acked_at_start.append(list(self.stream.acked))
        await self.release.wait()
        if self.fail_first > 0:
            self.fail_first -= 1
            raise RuntimeError("the batch failed")


def run(stream: FakeStream, work: Work, max_size: int = 100) -> asyncio.Task[None]:
    return asyncio.ensure_future(
        read_ahead(cast(faust.StreamT, stream), "test", work, max_size, 0.01)
    )


async def test_acks_follow_each_batch_in_log_order_and_the_next_batch_reads_ahead() -> None:
    stream = FakeStream()
    work = Work(stream)
    work.release.clear()
    agent = run(stream, work)
    stream.put(0, 1, 2)
    await wait_for(lambda: work.batches, timeout=5, what="the first batch")
    stream.put(*range(3, 40))  # arrive while the first batch is processed
    await wait_for(lambda: stream._queue.empty(), timeout=5, what="the stream read ahead")
    await asyncio.sleep(0)
    assert stream.enable_acks is False
    assert stream.acked == []  # nothing acked while its batch is in flight
    work.release.set()
    await wait_for(lambda: len(stream.acked) == 40, timeout=5, what="every ack")
    assert work.batches == [[0, 1, 2], list(range(3, 40))]
    assert work.acked_at_start[1] == [0, 1, 2]  # the second batch started after the first was acked
    assert stream.acked == list(range(40))
    stream.end()
    await asyncio.wait_for(agent, 5)


async def test_a_failing_batch_keeps_its_offsets_until_it_succeeds() -> None:
    stream = FakeStream()
    work = Work(stream, fail_first=1)
    agent = run(stream, work)
    stream.put(0, 1)
    await wait_for(lambda: len(work.batches) >= 1, timeout=5, what="the first attempt")
    stream.put(2)
    await wait_for(
        lambda: len(stream.acked) == 3, timeout=10, what="the retried batch and the next"
    )
    assert work.batches[:2] == [[0, 1], [0, 1]]  # retried whole, nothing acked in between
    assert work.acked_at_start[1] == []
    assert stream.acked == [0, 1, 2]
    stream.end()
    await asyncio.wait_for(agent, 5)


async def test_a_stopping_agent_leaves_the_batch_in_flight_unacked() -> None:
    stream = FakeStream()
    work = Work(stream)
    work.release.clear()
    agent = run(stream, work)
    stream.put(0, 1)
    await wait_for(lambda: work.batches, timeout=5, what="the batch in flight")
    stream.end()
    await asyncio.wait_for(agent, 5)
    assert stream.acked == []


class Held:
    """A ``ReadAhead`` callback that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def __call__(self, batch: list[int]) -> None:
        self.batches.append(batch)
        self.entered.set()
        await self.release.wait()


async def test_wait_each_lets_the_next_batch_gather_for_the_window_after_quick_work() -> None:
    seen = Held()
    # The sinks' write is quick: without the window each batch would hold only what arrived during it.
    ahead = ReadAhead(seen, max_size=3, within_s=60, wait_each=True)
    for i in range(3):  # a full batch starts at once
        await ahead.add(i)
    await asyncio.wait_for(seen.entered.wait(), 5)
    await ahead.add(3)  # read ahead while the first batch is processed
    seen.release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert (
        seen.batches == [[0, 1, 2]] and ahead.pending == 1
    )  # [3] waits for the window or a full batch
    await ahead.add(4)
    await ahead.add(5)
    await wait_for(lambda: len(seen.batches) == 2, timeout=5, what="the full second batch")
    assert seen.batches == [[0, 1, 2], [3, 4, 5]]
    await ahead.stop()


async def test_without_wait_each_the_next_batch_starts_as_soon_as_one_is_done() -> None:
    seen = Held()
    ahead = ReadAhead(seen, max_size=3, within_s=60)
    for i in range(3):
        await ahead.add(i)
    await asyncio.wait_for(seen.entered.wait(), 5)
    await ahead.add(3)
    seen.release.set()
    await wait_for(lambda: len(seen.batches) == 2, timeout=5, what="the read-ahead batch")
    assert seen.batches == [[0, 1, 2], [3]]
    await ahead.stop()
