"""Work-arounds for faust-streaming 0.15.3 behaviour, each in one named place.

``prime_producer_metadata``: a table created with ``use_partitioner=True``
picks the changelog partition with the *producer's* partitioner, and the
assignor's ``key_store`` does the same. Both call aiokafka's synchronous
``AIOKafkaProducer._partition``, which reads the producer's cached cluster
metadata; the producer only fetches metadata for topics it has already sent
to, so a table write or owner lookup fails with
``TypeError: 'NoneType' object is not iterable`` until the producer has sent
to that topic, and again whenever a metadata refresh drops a topic it was not
tracking. Faust acks the event whose processing raised, so a settlement
would be lost. On each assignment, before recovery completes and before
agents or views use them, we make the producer track (and fetch) every table
changelog and our topics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import faust

log = logging.getLogger(__name__)


def known_to_producer(app: faust.App, topic: str) -> bool:
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    return producer._metadata.partitions_for_topic(topic) is not None


async def prime_producer_metadata(app: faust.App, topics: Iterable[str]) -> None:
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    for topic in topics:
        # add_topic makes the client keep tracking it: partitions_for alone
        # returns early when an earlier all-topics fetch happened to include
        # the topic, and the next refresh (tracked topics only) drops it again.
        await producer.client.add_topic(topic)
        partitions = await producer.partitions_for(topic)
        log.debug("producer knows %d partitions of %s", len(partitions), topic)


def install(app: faust.App, extra_topics: Iterable[str] = ()) -> None:
    extra = list(extra_topics)

    @app.on_partitions_assigned.connect
    async def _prime(sender: Any, *args: Any, **kwargs: Any) -> None:
        names = [t.changelog_topic.get_topic_name() for t in app.tables.values()] + extra
        await prime_producer_metadata(app, names)
