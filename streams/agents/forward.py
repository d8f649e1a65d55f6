"""Agent: requests topic -> RabbitMQ work queues, offsets committed only after the publisher confirms.

A batch is published with confirms and retried (:data:`inferstream.retrying.REQUEST_PUBLISH`)
until RabbitMQ takes it (the partition waits meanwhile: that is the back-pressure). Faust acks the
batch's offsets only after this body returns, so a crash re-publishes the batch;
duplicates are harmless because everything downstream is idempotent by request id.
Then a ``dispatched`` status event per request goes to the results topic.

Before publishing, the batch's requests are confirmed in the quota table (this
worker owns their users' quota partitions: the topics are co-partitioned with
its changelogs): each gets its reservation entry (acknowledged before anything
is published, so a result can only settle a reservation the broker holds), and
an admission still pending when its request is in the log is no orphan
(:mod:`streams.agents.orphans`). The offsets wait for those writes' acks too, so
a crash replays a confirmation (idempotent) but never loses one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import faust

from bridges.clients.rabbitmq import PublishError, RabbitClient
from inferstream import clock
from inferstream.retrying import REQUEST_PUBLISH, failure
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from streams.agents import metrics
from streams.agents.guard import until_done
from streams.topics import Topics, send_and_wait
from tables.quota import QuotaBook

log = logging.getLogger(__name__)


async def publish_confirmed(rabbit: RabbitClient, batch: Sequence[InferenceRequest]) -> None:
    async for attempt in REQUEST_PUBLISH.retrying(
        PublishError,
        before_sleep=lambda state: log.warning(
            "publishing %d requests to RabbitMQ failed (attempt %d), retrying: %r",
            len(batch), state.attempt_number, failure(state),
        ),  # fmt: skip
    ):
        with attempt:
            await rabbit.publish_requests(batch)


async def send_events(topics: Topics, events: Sequence[ResultEvent]) -> None:
    """Write status events to the results topic and wait for the broker's acks."""
    await send_and_wait(topics.results, ((e.user_id, e) for e in events))


async def confirm_batch(book: QuotaBook, batch: Sequence[InferenceRequest]) -> list[asyncio.Future[Any]]:
    """Confirm every request of the batch in the quota table; the acks of its users' latest writes."""
    return await book.confirm_requests([(r.user_id, r.request_id, r.created_at, r.estimated_tokens) for r in batch])


def register_forward(
    app: faust.App, settings: Settings, topics: Topics, rabbit: RabbitClient, book: QuotaBook
) -> None:
    routes = set(rabbit.routes())

    async def forward(batch: Sequence[InferenceRequest]) -> None:
        confirmed = await confirm_batch(book, batch)
        routable = [r for r in batch if (r.task, r.model) in routes]
        if routable:
            await publish_confirmed(rabbit, routable)
            metrics.FORWARD_BATCHES.inc(len(routable))
        await asyncio.gather(*confirmed)
        now = clock.now()
        events = [ResultEvent.for_request(r, "dispatched", at=now) for r in routable]
        # Admitted by a gateway configured with a model this worker has no queue for:
        # a configuration mismatch; fail the request (refunded) rather than drop it.
        events += [
            ResultEvent.for_request(
                r, "failed", at=now,
                error={"type": "unroutable", "message": f"no work queue for {r.task}/{r.model}"},
            )
            for r in batch
            if (r.task, r.model) not in routes
        ]
        await send_events(topics, events)

    @app.agent(topics.requests, name="forward-requests", concurrency=1)
    async def forward_requests(stream: faust.StreamT[InferenceRequest]) -> None:
        async for batch in stream.take(settings.sink_batch_size, within=settings.sink_batch_wait_ms / 1000):
            await until_done("forward-requests", lambda: forward(batch))  # noqa: B023 - awaited at once
