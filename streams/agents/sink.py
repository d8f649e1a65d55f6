"""Agents: requests and results topics -> PostgreSQL rows, then the Redis cache, notifications, webhooks.

Each batch is upserted in one round trip (idempotent, rank-guarded) and the
sink retries while PostgreSQL is down; the batch's offsets are acked only
after the write returns (and its cache writes and notifications), so nothing
is lost and memory stays bounded. The agents read ahead
(:func:`streams.agents.readahead.read_ahead`): the next batch gathers while one
is written, instead of only what arrives in the ``within`` window after it.
With tracing on, each batch is written inside one ``sink`` span per record,
under the context its header names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import faust
from faust.types import EventT

from bridges.clients.store.rows import Event
from bridges.sink import ResultSink
from inferstream import tracing
from inferstream.settings import Settings
from streams.agents.readahead import read_ahead
from streams.topics import Topics


async def traced_write(sink: ResultSink, topic: str, events: Sequence[EventT]) -> None:
    """``sink.write`` of the events' values, with a span per record; the notification step finds them by request id."""
    values = [cast(Event, e.value) for e in events]
    spans = {
        v.request_id: tracing.start(
            "sink",
            tracing.header_context(e.headers),
            kind=tracing.SpanKind.CONSUMER,
            attributes={
                "inferstream.request_id": v.request_id,
                "messaging.system": "kafka",
                "messaging.destination.name": topic,
                "db.system.name": "postgresql",
                "inferstream.batch_size": len(events),
            },
        )  # fmt: skip
        for e, v in zip(events, values, strict=True)
    }
    token = tracing.SINK_SPANS.set(spans)
    try:
        await sink.write(values)
    except BaseException as exc:
        tracing.end_all(spans.values(), exc)
        raise
    finally:
        tracing.SINK_SPANS.reset(token)
    tracing.end_all(spans.values())


def register_sinks(app: faust.App, settings: Settings, topics: Topics, sink: ResultSink) -> None:
    within = settings.sink_batch_wait_ms / 1000
    traced = tracing.ENABLED  # decided once, when the pipeline is built

    def agent(topic: faust.TopicT, name: str) -> None:
        async def write(events: list[EventT]) -> None:
            if traced:
                await traced_write(sink, topic.get_topic_name(), events)
            else:
                await sink.write([cast(Event, e.value) for e in events])

        @app.agent(topic, name=name, concurrency=1)
        async def write_rows(stream: faust.StreamT) -> None:
            await read_ahead(stream, name, write, settings.sink_batch_size, within, wait_each=True)

    agent(topics.requests, "sink-requests")
    agent(topics.results, "sink-results")
