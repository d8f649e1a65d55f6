"""Coalesces concurrent set lookups (``ids -> subset``) issued in the same loop tick into one call.

A burst of deliveries from RabbitMQ starts one handler per message in the same
tick; each asks "is this request cancelled?". One Redis round trip answers them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

Lookup = Callable[[Sequence[str]], Awaitable[set[str]]]


class CoalescedLookup:
    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._waiting: list[tuple[frozenset[str], asyncio.Future[set[str]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0

    async def __call__(self, ids: Sequence[str]) -> set[str]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[set[str]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((frozenset(ids), fut))
        return await fut

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[frozenset[str], asyncio.Future[set[str]]]]) -> None:
        wanted = sorted(set().union(*(ids for ids, _ in batch)))
        self.calls += 1
        try:
            found = set(await self._lookup(wanted))
        except Exception as exc:  # handed to every waiter, which decides what a failure means
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for ids, fut in batch:
            if not fut.done():
                fut.set_result(found & ids)
