"""`dispatched` events only for requests still waiting a while after their hand-off to RabbitMQ.

Most requests move on within milliseconds of the forward agent publishing them:
their `running` or terminal event reaches the results topic first. For those a
`dispatched` event would be one more log write, two more agent reads, a row
update and a notification, for a status nobody sees. So the forward agent hands
the batch here; after ``dispatched_after_ms`` this writes `dispatched` for the
requests of the batch that no later event has been seen for (the settle agent
reports what it reads: the results topic is co-partitioned, so this worker
sees every event of its users). The work message carries ``dispatched_at`` and
every later event repeats it, so the row's history and ``dispatched_at`` are
the same either way.

Best effort by design: a `dispatched` event lost in a crash, or written after
the terminal one, changes nothing that matters (the row is rank-guarded; the
terminal status is written by the ML worker and is never lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

from aiokafka.errors import KafkaError

from schemas.records import InferenceRequest, ResultEvent
from streams.topics import Topics, send_events

log = logging.getLogger(__name__)


class DispatchedEvents:
    """Writes the `dispatched` events of forwarded batches, late and only where still wanted."""

    def __init__(self, topics: Topics, after_ms: int) -> None:
        self.topics = topics
        self.after_s = max(0, after_ms) / 1000
        self._moved_on: dict[str, float] = {}  # request id -> when a later event was read (monotonic)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pruned_at = time.monotonic()

    def moved_on(self, events: Iterable[ResultEvent]) -> None:
        """Events read from the results topic: their requests need no `dispatched` event any more."""
        now = time.monotonic()
        for event in events:
            if event.status != "dispatched":
                self._moved_on[event.request_id] = now
        if now - self._pruned_at > 4 * self.after_s + 1:
            # A request is looked up once, ``after_s`` after its hand-off: older entries are done with.
            horizon = now - 2 * self.after_s - 1
            self._moved_on = {rid: at for rid, at in self._moved_on.items() if at >= horizon}
            self._pruned_at = now

    async def handed_off(self, reqs: Sequence[InferenceRequest], at: float) -> None:
        """``reqs`` were published to RabbitMQ at ``at``: write their `dispatched` events now or later."""
        if not reqs:
            return
        if self.after_s <= 0:
            await self._write(reqs, at)
            return
        task = asyncio.ensure_future(self._later(reqs, at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _later(self, reqs: Sequence[InferenceRequest], at: float) -> None:
        await asyncio.sleep(self.after_s)
        waiting = [r for r in reqs if r.request_id not in self._moved_on]
        if not waiting:
            return
        try:
            await self._write(waiting, at)
        except KafkaError as exc:
            log.warning("%d dispatched events not written (best effort): %r", len(waiting), exc)

    async def _write(self, reqs: Sequence[InferenceRequest], at: float) -> None:
        await send_events(self.topics, (ResultEvent.for_request(r, "dispatched", at=at) for r in reqs))

    async def drain(self) -> None:
        """Wait for the events still to be written (tests; a stopping worker drops them: best effort)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
