"""Dynamic batching: requests' texts gathered for up to N texts or T ms, one model call, results split back.

At most ``max_in_flight`` batches are out at once. While they are, texts keep
gathering instead of leaving in small batches that would only queue at the
model: the next batch goes out when one returns (or a full one when there is
room), so batches grow with the load. When the model is idle, a batch waits at
most T for company.

A request is never split across calls: if it alone exceeds ``max_items`` it
goes out on its own. A batch's ``usage`` is shared out between its requests in
proportion to their own token counts (largest remainder, so the parts add up
to the model's figure exactly). Each request also learns which backend served
its batch (the call's third value).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from inferstream.tokens import count_tokens

log = logging.getLogger(__name__)

Vectors = list[list[float]]
Usage = dict[str, int]
# A batch's vectors, usage, and the name of the backend that served it.
Served = tuple[Vectors, Usage, str]
BatchCall = Callable[[list[str]], Awaitable[Served]]


@dataclass
class _Item:
    texts: list[str]
    arrived: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    future: asyncio.Future[Served] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def split_usage(usage: Usage, weights: Sequence[int]) -> list[Usage]:
    """Share each figure of ``usage`` out by ``weights``; the parts sum to the whole."""
    n = len(weights)
    if n == 1:
        return [dict(usage)]
    total_weight = sum(weights)
    shares: list[Usage] = [{} for _ in range(n)]
    for key, value in usage.items():
        if total_weight <= 0:
            exact = [value / n] * n
        else:
            exact = [value * w / total_weight for w in weights]
        floors = [int(x) for x in exact]
        leftover = value - sum(floors)
        for i in sorted(range(n), key=lambda i: exact[i] - floors[i], reverse=True)[:leftover]:
            floors[i] += 1
        for i in range(n):
            shares[i][key] = floors[i]
    return shares


class Batcher:
    """Gathers texts for one route; ``submit()`` resolves with this request's vectors, usage share and backend."""

    def __init__(
        self, call: BatchCall, *, max_items: int, max_wait_s: float, max_in_flight: int = 2, name: str = ""
    ) -> None:
        self._call = call
        self.max_items = max(1, max_items)
        self.max_wait_s = max_wait_s
        self.max_in_flight = max(1, max_in_flight)
        self.name = name
        self._pending: list[_Item] = []
        self._pending_texts = 0
        # The due time is kept beside the handle: uvloop's call_at returns a plain Handle
        # (no when()) for a time already reached.
        self._timer: asyncio.Handle | None = None
        self._timer_due: float | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, texts: list[str]) -> Served:
        item = _Item(list(texts))
        self._pending.append(item)
        self._pending_texts += len(texts)
        self._dispatch()
        try:
            return await item.future
        except asyncio.CancelledError:
            # Not sent yet: take it out so the batch does not carry a dead request.
            if item in self._pending:
                self._pending.remove(item)
                self._pending_texts -= len(item.texts)
            raise

    def _dispatch(self) -> None:
        """Send what is due while there is room; otherwise wait for the timer or a returning batch."""
        loop = asyncio.get_running_loop()
        while self._pending and len(self._running) < self.max_in_flight:
            waited = loop.time() - self._pending[0].arrived
            if self._pending_texts < self.max_items and waited < self.max_wait_s:
                break
            self._send(self._take())
        due = self._pending[0].arrived + self.max_wait_s if self._pending else None
        if len(self._running) >= self.max_in_flight:
            due = None  # a returning batch dispatches next
        if self._timer is not None and due != self._timer_due:
            self._timer.cancel()
            self._timer = None
        if due is not None and self._timer is None:
            self._timer, self._timer_due = loop.call_at(due, self._on_timer), due

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self) -> list[_Item]:
        """The oldest requests that fit in one batch (at least one, even if it alone is too big)."""
        taken, texts = 0, 0
        for item in self._pending:
            if taken and texts + len(item.texts) > self.max_items:
                break
            taken += 1
            texts += len(item.texts)
        items, self._pending = self._pending[:taken], self._pending[taken:]
        self._pending_texts -= texts
        return items

    def _send(self, items: list[_Item]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(items))
        self._running.add(task)
        task.add_done_callback(self._returned)

    def _returned(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._pending:
            self._dispatch()

    async def _run(self, items: list[_Item]) -> None:
        texts = [t for item in items for t in item.texts]
        try:
            vectors, usage, backend = await self._call(texts)
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise
        except Exception as exc:  # handed to every waiter, who decides; nothing is swallowed
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        weights = [count_tokens(item.texts) for item in items] if len(items) > 1 else [1]
        offset = 0
        for item, share in zip(items, split_usage(usage, weights), strict=True):
            part = vectors[offset : offset + len(item.texts)]
            offset += len(item.texts)
            if not item.future.done():
                item.future.set_result((part, share, backend))

    async def close(self) -> None:
        """Cancel batches in flight and waiting (their waiters see CancelledError)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for item in self._pending:
            item.future.cancel()
        self._pending, self._pending_texts = [], 0
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
