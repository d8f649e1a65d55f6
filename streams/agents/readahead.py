"""Batches that gather while the previous one is processed, and an agent loop that acks them after their work.

Faust's ``take_events``/``take`` stop reading while their batch is processed, so under load
each batch holds only what arrives in the ``within`` window after the previous one: a few
events, each batch paying the same round trips (quota confirms, changelog acks, a PostgreSQL
upsert), and the agent falls behind (docs/fairshare.md, "Why the forward agent fell behind").
:class:`ReadAhead` keeps reading: the next batch gathers while one is processed and starts as
soon as it is done. :func:`read_ahead` runs an agent's stream through it with the stream's own
acks off, acking each event only after its batch's work returned, in log order; Faust commits
an offset only when every event before it is acked, so what is read ahead is never committed
early, and a crash or stop re-reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast

import faust
from faust.types import EventT

from streams.agents.guard import until_done

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """Batches of at most ``max_size`` items, processed one at a time, in order; the next batch
    gathers while one is processed.

    After an idle spell the first batch waits up to ``within_s`` for more (or until full), as
    ``take_events`` does; a batch that gathered while another was processed starts as soon as that
    one is done, or, with ``wait_each``, after up to ``within_s`` more (for work so quick that the
    next batch would otherwise hold only what arrived during it: the sinks' upserts). ``add`` waits
    while a full batch waits (back-pressure to the caller). If ``process`` raises, the error is
    raised by the next ``add`` (and nothing is processed after it).
    """

    def __init__(
        self,
        process: Callable[[list[T]], Awaitable[None]],
        max_size: int,
        within_s: float,
        wait_each: bool = False,
    ) -> None:
        self._process = process
        self.wait_each = wait_each
        self.max_size = max(1, max_size)
        self.within_s = max(0.0, within_s)
        self._pending: list[T] = []
        self._task: asyncio.Task[None] | None = None  # processes batches while any are pending
        self._full = asyncio.Event()  # a whole batch is pending
        self._room = asyncio.Event()  # pending is below max_size again (or processing failed)
        self._room.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def add(self, item: T) -> None:
        self._raise_failed()
        while len(self._pending) >= self.max_size:
            self._room.clear()
            await self._room.wait()
            self._raise_failed()
        self._pending.append(item)
        if len(self._pending) >= self.max_size:
            self._full.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._task.add_done_callback(lambda _: self._room.set())

    async def _gather(self) -> None:
        if len(self._pending) < self.max_size and self.within_s > 0:
            try:
                await asyncio.wait_for(self._full.wait(), self.within_s)
            except TimeoutError:
                pass

    async def _run(self) -> None:
        await self._gather()
        while self._pending:
            batch, self._pending = self._pending[: self.max_size], self._pending[self.max_size :]
            self._full.clear()
            self._room.set()
            await self._process(batch)
            if self.wait_each and self._pending:
                await self._gather()
        self._task = None  # no await since the check above: an add now starts a new run

    def _raise_failed(self) -> None:
        task = self._task
        if task is not None and task.done() and not task.cancelled():
            failed = task.exception()
            if failed is not None:
                raise failed

    async def stop(self) -> None:
        """Cancel the batch in flight (its items are not processed: a stopping agent's offsets stay unacked)."""
        task, self._task = self._task, None
        self._pending = []
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


async def read_ahead(
    stream: faust.StreamT,
    agent: str,
    work: Callable[[list[EventT]], Awaitable[None]],
    max_size: int,
    within_s: float,
    wait_each: bool = False,
) -> None:
    """An agent's body: the stream's events in read-ahead batches, each ``work``-ed until it succeeds
    (:func:`streams.agents.guard.until_done`: a failing batch keeps its offsets), then acked, in order."""
    # ack, enable_acks and events are on the Stream class, not on StreamT.
    events_of = cast(faust.Stream, stream)
    events_of.enable_acks = False

    async def done(events: list[EventT]) -> None:
        await until_done(agent, lambda: work(events))
        for event in events:
            await events_of.ack(event)

    batches: ReadAhead[EventT] = ReadAhead(done, max_size, within_s, wait_each)
    try:
        async for event in events_of.events():
            await batches.add(event)
    finally:
        await batches.stop()
