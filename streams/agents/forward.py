"""Agent: requests topic -> RabbitMQ work queues, offsets committed only after the publisher confirms.

A batch is published with confirms and retried (:data:`inferstream.retrying.REQUEST_PUBLISH`)
until RabbitMQ takes it (the partition waits meanwhile: that is the back-pressure). Faust acks the
batch's offsets only after this body returns, so a crash re-publishes the batch;
duplicates are harmless because everything downstream is idempotent by request id.
Then the batch's ``dispatched`` events are left to :mod:`streams.agents.dispatched`
(written only for requests still waiting a while later).

Before publishing, the batch's requests are confirmed in the quota table (this
worker owns their users' quota partitions: the topics are co-partitioned with
its changelogs): each gets its reservation entry (acknowledged before anything
is published, so a result can only settle a reservation the broker holds), and
an admission still pending when its request is in the log is no orphan
(:mod:`streams.agents.orphans`). The offsets wait for those writes' acks too, so
a crash replays a confirmation (idempotent) but never loses one.

The agent reads ahead (:class:`~streams.agents.readahead.ReadAhead`): while one batch waits for those acks and
confirms, the next one gathers, and starts as soon as the first is done. Faust's
``take_events`` stops reading while its batch is processed, so under load each
batch held only what arrived in the ``within`` window after the previous one (a
few requests, each batch paying the same confirm round trips): the agent fell
behind admission by seconds, and every user's request waited in the log behind
a burst (docs/fairshare.md, "Why the forward agent fell behind").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import cast

import faust
from faust.types import EventT

from bridges.clients.rabbitmq import PublishError, RabbitClient
from inferstream import clock, tracing
from inferstream.retrying import REQUEST_PUBLISH, failure
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from streams import queue_eta
from streams.agents import metrics
from streams.agents.dispatched import DispatchedEvents
from streams.agents.readahead import read_ahead
from streams.topics import Topics, send_events
from tables.quota import Logged
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)


async def publish_confirmed(
    rabbit: RabbitClient, batch: Sequence[InferenceRequest], traces: Sequence[str] | None = None
) -> None:
    async for attempt in REQUEST_PUBLISH.retrying(
        PublishError,
        before_sleep=lambda state: log.warning(
            "publishing %d requests to RabbitMQ failed (attempt %d), retrying: %r",
            len(batch),
            state.attempt_number,
            failure(state),
        ),  # fmt: skip
    ):
        with attempt:
            await rabbit.publish_requests(batch, traces=traces)


def logged(event: EventT) -> Logged:
    """What confirming a request read from the log needs (a redriven request was never admitted)."""
    r = cast(InferenceRequest, event.value)
    return Logged(
        r.user_id, r.request_id, r.created_at, r.estimated_tokens, r.quota_day, event.message.offset,
        admitted=r.redrive_of is None, batch_id=r.batch_id,
        batch_line=-1 if r.batch_line is None else r.batch_line,
    )  # fmt: skip


async def traced_publish(
    rabbit: RabbitClient, read: Sequence[EventT], routable: Sequence[InferenceRequest]
) -> None:
    """``publish_confirmed`` with one span per request, under the context its log record carries."""
    parents = {
        cast(InferenceRequest, e.value).request_id: tracing.header_context(e.headers) for e in read
    }
    spans = [
        tracing.start(
            "forward to work queue",
            parents.get(r.request_id),
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "inferstream.request_id": r.request_id,
                "messaging.system": "rabbitmq",
                "messaging.destination.name": rabbit.work_queue_name(r.task, r.model),
                "inferstream.batch_size": len(routable),
            },
        )  # fmt: skip
        for r in routable
    ]
    try:
        await publish_confirmed(rabbit, routable, [tracing.traceparent(s) for s in spans])
    except BaseException as exc:
        tracing.end_all(spans, exc)
        raise
    tracing.end_all(spans)


def register_forward(
    app: faust.App,
    settings: Settings,
    topics: Topics,
    rabbit: RabbitClient,
    book: QuotaBook,
    dispatched: DispatchedEvents,
    batch_cancelled: Callable[[str, str], bool] = lambda user_id, batch_id: False,
) -> None:
    """``batch_cancelled(user_id, batch_id)``: whether that batch was cancelled (its lines still in the
    log are answered ``cancelled``, refunded, instead of being published)."""
    queue_eta.SHARED.attach(settings, rabbit=rabbit)

    async def forward(read: Sequence[EventT]) -> None:
        # The routes served now: a reload may add some, and retires others.
        routes = rabbit.route_keys()
        copies: set[str] = set()  # batch lines written twice (after a crash of their writer): run once
        confirmed = await book.confirm_requests([logged(e) for e in read], copies)
        at = clock.now()
        batch: list[InferenceRequest] = []
        stopped: list[InferenceRequest] = []  # lines of cancelled batches: answered, not published
        for e in read:
            r = cast(InferenceRequest, e.value)
            if r.request_id in copies:
                continue
            cancelled = r.batch_id is not None and batch_cancelled(r.user_id, r.batch_id)
            (stopped if cancelled else batch).append(r)
        # The work message says when it was handed off; every later event of the request repeats it.
        routable = [r.derive(dispatched_at=at) for r in batch if (r.task, r.model) in routes]
        if routable and tracing.ENABLED:
            await traced_publish(rabbit, read, routable)
            metrics.FORWARD_BATCHES.inc(len(routable))
        elif routable:
            await publish_confirmed(rabbit, routable)
            metrics.FORWARD_BATCHES.inc(len(routable))
        queue_eta.SHARED.dispatched(routable)  # memory only; the ETA poller adds it to Redis
        await asyncio.gather(*confirmed)
        # Admitted by a gateway configured with a route this worker has no queue for (another
        # routes file, or a route removed before this worker started): fail it (refunded) rather
        # than drop it. A route removed by a reload of this worker is retired, not unroutable.
        unroutable = [
            ResultEvent.for_request(
                r,
                "failed",
                at=at,
                error={"type": "unroutable", "message": f"no work queue for {r.task}/{r.model}"},
            )
            for r in batch
            if (r.task, r.model) not in routes
        ]
        unroutable += [
            ResultEvent.for_request(
                r,
                "cancelled",
                at=at,
                error={"type": "cancelled", "message": f"batch {r.batch_id} was cancelled"},
            )
            for r in stopped
        ]
        if unroutable:
            await send_events(topics, unroutable)
        await dispatched.handed_off(routable, at)

    @app.agent(topics.requests, name="forward-requests", concurrency=1)
    async def forward_requests(stream: faust.StreamT[InferenceRequest]) -> None:
        await read_ahead(
            stream,
            "forward-requests",
            forward,
            settings.sink_batch_size,
            settings.sink_batch_wait_ms / 1000,
        )
