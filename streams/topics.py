"""The log's topics: requests and results, both keyed by ``user_id`` (JSON-encoded, like table keys)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faust

from inferstream import tracing
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent


@dataclass(frozen=True)
class Topics:
    requests: faust.TopicT
    results: faust.TopicT


def define_topics(app: faust.App, settings: Settings) -> Topics:
    requests = app.topic(
        settings.requests_topic,
        key_type=str,
        value_type=InferenceRequest,
        key_serializer="json",
        partitions=settings.partitions,
    )
    results = app.topic(
        settings.results_topic,
        key_type=str,
        value_type=ResultEvent,
        key_serializer="json",
        partitions=settings.partitions,
    )
    return Topics(requests=requests, results=results)


async def send_and_wait(topic: faust.TopicT, messages: Iterable[tuple[str, Any]], **options: Any) -> None:
    """Send ``(key, value)`` messages (the producer batches them) and return once the broker acked all.

    With tracing on, per-message headers set by the caller in :data:`inferstream.tracing.RECORD_HEADERS`
    (one entry per message, in order) go with them.
    """
    headers = tracing.RECORD_HEADERS.get() if tracing.ENABLED else None
    if headers is None:
        pending = [await topic.send(key=key, value=value, **options) for key, value in messages]
    else:
        pending = [
            await topic.send(key=key, value=value, headers=h, **options)
            for (key, value), h in zip(messages, headers, strict=True)
        ]
    for fut in pending:
        await fut


async def send_events(topics: Topics, events: Iterable[ResultEvent]) -> None:
    """Write status events to the results topic (keyed by user) and wait for the broker's acks."""
    await send_and_wait(topics.results, ((e.user_id, e) for e in events))
