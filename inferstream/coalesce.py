"""Coalesces calls issued in the same event-loop tick into one call.

Hot paths start many handlers in one tick (a burst of RabbitMQ deliveries, a
burst of admissions); each would make its own small round trip. Writes on
loopback are what the worker spends most of its CPU on (py-spy: 35% in socket
writes under load), so one round trip serves them all:

:class:`Coalesced`: "do this for these items" (e.g. write cache documents);
every caller gets the combined call's result or its exception. The ML worker
gathers across round trips instead (:mod:`workers.gather`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalesced(Generic[T, R]):
    """``await coalesced(item)`` returns what the one ``call(items)`` that carried ``item`` returned."""

    def __init__(self, call: Callable[[list[T]], Awaitable[R]]) -> None:
        self._call = call
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[R]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if not self._items:
            loop.call_soon(self._flush)
        self._items.append(item)
        self._waiters.append(fut)
        return await fut

    def _flush(self) -> None:
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.get_running_loop().create_task(self._run(items, waiters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[T], waiters: list[asyncio.Future[R]]) -> None:
        self.calls += 1
        try:
            result = await self._call(items)
        except Exception as exc:  # handed to every waiter, which decides what a failure means
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut in waiters:
            if not fut.done():
                fut.set_result(result)
