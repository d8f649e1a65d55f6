"""Fair share between the users of one route: the order in which an ML worker starts the messages it holds.

A :class:`FairGate` per route endpoint lets at most ``slots`` jobs past at
once. When a slot frees it goes to the highest priority with a waiting job
and, within that priority, round robin over the users waiting (each user's
jobs in delivery order). The gate only orders messages already delivered and
unacked, so it holds no state a crash could lose: see ``docs/fairshare.md``.
"""

from __future__ import annotations

import asyncio
from collections import deque

from inferstream.routes import Route

__all__ = ["FAIR_SHARE", "FairGate", "GateClosed", "gate_slots"]

# On by default; False restores FIFO starts exactly. The gate can only reorder what the worker
# holds, so INFERSTREAM_ML_PREFETCH is the fairness horizon (docs/fairshare.md: why 64 stays the
# default for now, and what a deep one costs).
FAIR_SHARE = True
# Jobs past the gate per call slot: the endpoint's own semaphore does the exact limiting, and a
# job asleep in a retry backoff should not leave a call slot idle.
SLOTS_PER_CALL = 2
PRIORITIES = ("high", "normal", "low")


class GateClosed(Exception):  # control flow: the worker is stopping, the message goes back to RabbitMQ
    """The gate closed (shutdown) before this job got a slot."""


def gate_slots(route: Route) -> int:
    """Jobs of ``route`` let past the gate at once."""
    if route.task == "embed":
        return max(1, route.batch_size * route.batch_concurrency) * SLOTS_PER_CALL
    return max(1, route.concurrency) * SLOTS_PER_CALL


class _Level:
    """The waiting jobs of one priority: a FIFO per user and a ring of the users with any."""

    __slots__ = ("queues", "ring")

    def __init__(self) -> None:
        self.queues: dict[str, deque[asyncio.Future[None]]] = {}
        self.ring: deque[str] = deque()

    def add(self, user: str, waiter: asyncio.Future[None]) -> None:
        queue = self.queues.get(user)
        if queue is None:
            queue = self.queues[user] = deque()
            self.ring.append(user)
        queue.append(waiter)

    def pop(self) -> asyncio.Future[None] | None:
        """The next user's oldest waiter; that user goes to the back of the ring if it has more."""
        while self.ring:
            user = self.ring.popleft()
            queue = self.queues[user]
            waiter = queue.popleft()
            if queue:
                self.ring.append(user)
            else:
                del self.queues[user]
            return waiter
        return None

    def discard(self, user: str, waiter: asyncio.Future[None]) -> bool:
        queue = self.queues.get(user)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        if not queue:
            del self.queues[user]
            self.ring.remove(user)
        return True


class FairGate:
    """At most ``slots`` holders; the next slot by priority, then round robin over users."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.active = 0
        self.waiting = 0
        self.closed = False
        self._levels = {p: _Level() for p in PRIORITIES}

    def try_enter(self) -> bool:
        """Take a slot without waiting when one is free and nobody waits (the uncontended path)."""
        if self.closed:
            raise GateClosed()
        if self.waiting or self.active >= self.slots:
            return False
        self.active += 1
        return True

    async def enter(self, user: str, priority: str) -> None:
        """Wait for a slot in fair order; raises :class:`GateClosed` if the gate closes first."""
        if self.try_enter():
            return
        level = self._levels.get(priority) or self._levels["normal"]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        level.add(user, waiter)
        self.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if level.discard(user, waiter):
                self.waiting -= 1
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave()  # granted just before the cancel: pass the slot on
            raise

    def leave(self) -> None:
        """Give a slot back; the next waiter in fair order gets it."""
        self.active -= 1
        self._grant()

    def close(self) -> None:
        """Refuse new entries and fail every waiter with :class:`GateClosed`."""
        self.closed = True
        for level in self._levels.values():
            while (waiter := level.pop()) is not None:
                self.waiting -= 1
                if not waiter.done():
                    waiter.set_exception(GateClosed())

    def _grant(self) -> None:
        while self.waiting and self.active < self.slots:
            for priority in PRIORITIES:
                waiter = self._levels[priority].pop()
                if waiter is not None:
                    break
            else:  # pragma: no cover - waiting counts only queued waiters
                return
            self.waiting -= 1
            if waiter.done():  # cancelled and not yet discarded by its task
                continue
            self.active += 1
            waiter.set_result(None)
