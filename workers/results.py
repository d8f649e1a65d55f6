"""Result events that finish together leave as one RabbitMQ message, confirmed once.

A publish with confirm per event was the ML worker's largest cost per request
(py-spy under load: socket writes 22% of samples, most of them aiormq's frame
writer). Events are gathered (:class:`workers.gather.Gathered`: the callers of
one event-loop tick, and while a message waits for its confirm, every event
that finishes meanwhile), up to ``max_events``, into one message
(``RabbitClient.publish_results``); every publisher returns when that message
is confirmed, or gets its :class:`~bridges.clients.rabbitmq.PublishError` (and
retries in a later message). Nothing is acked before its event is confirmed,
so a worker killed before the confirm leaves its work messages unacked and
RabbitMQ redelivers them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from schemas.records import ResultEvent
from workers import metrics
from workers.gather import Gathered

__all__ = ["MAX_EVENTS", "ResultPublisher"]

MAX_EVENTS = 64  # one ML worker's prefetch: a full tick of answers fits in one message


class PublishesResults(Protocol):
    async def publish_results(
        self, events: Sequence[ResultEvent], traces: Sequence[str | None] | None = None
    ) -> None: ...


class ResultPublisher:
    """``await publisher.publish(event)`` returns once the message carrying ``event`` is confirmed."""

    def __init__(
        self, rabbit: PublishesResults, *, max_events: int = MAX_EVENTS, max_in_flight: int = 1
    ) -> None:
        self.rabbit = rabbit
        self._gathered: Gathered[ResultEvent, None] = Gathered(
            self._send, max_items=max_events, max_in_flight=max_in_flight
        )
        # Tracing on: each waiting event's traceparent (by identity), sent as the message's header list.
        self._traces: dict[int, str] = {}

    @property
    def messages(self) -> int:
        return self._gathered.calls

    async def publish(self, event: ResultEvent, trace: str | None = None) -> None:
        if trace is None:
            await self._gathered(event)
            return
        self._traces[id(event)] = trace
        try:
            await self._gathered(event)
        finally:
            self._traces.pop(id(event), None)

    async def _send(self, events: list[ResultEvent]) -> None:
        metrics.RESULT_BATCH.observe(len(events))
        if self._traces:
            await self.rabbit.publish_results(events, [self._traces.get(id(e)) for e in events])
        else:
            await self.rabbit.publish_results(events)

    async def close(self) -> None:
        """Cancel messages still waiting for their confirm (their publishers see CancelledError)."""
        await self._gathered.close()
