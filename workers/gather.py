"""Calls gathered while the previous one is out: one round trip serves every caller that came meanwhile.

:class:`inferstream.coalesce.Coalesced` joins the callers of one event-loop
tick. Under the ML worker's load that made batches of two (py-spy and the
``inferstream_ml_result_batch_events`` histogram: 8,182 events in 4,191
results messages): model answers arrive on separate connections, a tick or
two apart. Here the items of a tick leave together when no call is out; while
``max_in_flight`` calls are out they keep gathering and leave, up to
``max_items`` a call, as soon as one returns. A lone caller waits for nothing
(no added latency one request at a time); under load the wait is at most one
round trip, and each round trip carries everything that arrived during the
last one. The ML worker gathers its results messages (``workers/results.py``)
and its cancellation lookups (:class:`GatheredLookup`, one Redis ``MGET``)
this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Gathered", "GatheredLookup"]

T = TypeVar("T")
R = TypeVar("R")


class Gathered(Generic[T, R]):
    """``await gathered(item)`` returns what the one ``call(items)`` that carried ``item`` returned."""

    def __init__(
        self, call: Callable[[list[T]], Awaitable[R]], *, max_items: int, max_in_flight: int = 1
    ) -> None:
        self._call = call
        self.max_items = max(1, max_items)
        self.max_in_flight = max(1, max_in_flight)
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[R]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self.calls = 0

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        if len(self._running) < self.max_in_flight:
            if len(self._items) >= self.max_items:
                self._dispatch()
            elif not self._scheduled:
                self._scheduled = True
                loop.call_soon(self._dispatch)  # the rest of this tick's callers come along
        return await waiter

    def _dispatch(self) -> None:
        self._scheduled = False
        while self._items and len(self._running) < self.max_in_flight:
            items, waiters = self._items[: self.max_items], self._waiters[: self.max_items]
            del self._items[: self.max_items], self._waiters[: self.max_items]
            task = asyncio.get_running_loop().create_task(self._run(items, waiters))
            self._running.add(task)
            task.add_done_callback(self._returned)

    def _returned(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._items:
            self._dispatch()

    async def _run(self, items: list[T], waiters: list[asyncio.Future[R]]) -> None:
        self.calls += 1
        try:
            result = await self._call(items)
        except asyncio.CancelledError:
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:  # handed to every waiter, which decides what a failure means
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(result)

    async def close(self) -> None:
        """Cancel the calls still out (their callers see CancelledError) and what waits to go."""
        for waiter in self._waiters:
            waiter.cancel()
        self._items, self._waiters = [], []
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


Lookup = Callable[[Sequence[str]], Awaitable[set[str]]]


class GatheredLookup:
    """``await lookup(ids)``: those of ``ids`` that the one gathered lookup (of every caller's ids) found."""

    def __init__(self, lookup: Lookup, *, max_callers: int = 256) -> None:
        self._lookup = lookup
        self._gathered: Gathered[frozenset[str], set[str]] = Gathered(
            self._look_up_all, max_items=max_callers
        )

    @property
    def calls(self) -> int:
        return self._gathered.calls

    async def __call__(self, ids: Sequence[str]) -> set[str]:
        wanted = frozenset(ids)
        return await self._gathered(wanted) & wanted

    async def _look_up_all(self, wanted: list[frozenset[str]]) -> set[str]:
        return set(await self._lookup(sorted(frozenset[str]().union(*wanted))))
