"""Work-arounds for faust-streaming 0.15.3 behaviour, each in one named place.

``set_fetch_max_wait``: Faust hard-codes ``fetch_max_wait_ms=1500`` for its
consumer. Kafka and Redpanda answer a waiting fetch as soon as data arrives,
so that costs nothing there; Tansu (the local broker) holds every fetch for the
full wait even when data arrives meanwhile (measured: 713-1464 ms per message
at 1500, 14-16 ms at 100, 1-4 ms at 20), which adds about 0.75 s per log hop.
``INFERSTREAM_FETCH_MAX_WAIT_MS`` replaces the figure on every consumer Faust
creates.

``tables_recovered``: the legacy ``faust.web`` server starts before table
recovery, so a view can run while the quota table is still being rebuilt;
admission checks this and answers 503 until recovery completes.

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

``recover_to_true_end``: Faust's table recovery reads each changelog partition
up to ``consumer.end_offsets`` (ListOffsets). Tansu 0.6 answers that with the
last produced batch's base offset + 1, so a restarted worker recovered a state
older than the last one written (seen after kill -9: tokens used 122, reserved
8, where the changelog's last state said 130 and 0), and the settlements lost
that way were never made again. The end now comes from a fetch's high
watermark (:func:`streams.logread.true_ends`), never below ListOffsets' answer.

``started_producer``: every Faust send (``Topic.send``, and each table
changelog write through the producer buffer) first awaits
``App.maybe_start_producer``, which is decorated with mode's ``@stampede``,
whose ``__call__`` begins with ``await asyncio.sleep(0)``: a forced trip
through the event loop per record, even with the producer long started. That
trip lets aiokafka's sender drain its accumulator after every record, so a
batch of sends went out as one produce request per record (15,912 produce
requests for 20,001 records in a micro-benchmark): 90-95 us of CPU per record
against 26-29 us without the trip, and as many requests for the broker to
answer. :class:`streams.application.InferstreamApp` returns the started
producer directly and leaves the stampede to the first start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import faust
from mode import ServiceT

from streams import logread

log = logging.getLogger(__name__)


def set_fetch_max_wait(fetch_max_wait_ms: int) -> None:
    """Make every consumer Faust builds wait at most ``fetch_max_wait_ms`` per fetch."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    original = getattr(thread._create_consumer, "__wrapped__", thread._create_consumer)

    def create_consumer(self: Any, loop: Any) -> Any:
        consumer = original(self, loop)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer

    create_consumer.__wrapped__ = original  # type: ignore[attr-defined]
    thread._create_consumer = create_consumer  # type: ignore[method-assign]


def started_producer(app: faust.App) -> Any | None:
    """The app's producer if it is started and no transaction is open (Faust would return its
    transaction manager then), else None: the caller falls back to Faust's own ``maybe_start_producer``."""
    producer = app.producer
    if app.in_transaction or not cast(Any, producer)._started.is_set():
        return None
    return producer


def run_with_app(app: faust.App, service: ServiceT) -> None:
    """Start ``service`` with the app. ``App.service`` takes instances at run time; it is typed for classes."""
    app.service(cast(Any, service))


def tables_recovered(app: faust.App) -> bool:
    """True once table recovery finished. Faust starts its aiohttp web server *before* recovery
    (the legacy web stack is a boot dependency), so views must check this themselves."""
    return bool(cast(Any, app.tables).recovery.completed.is_set())


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


def recover_to_true_end(app: faust.App) -> None:
    """Make Faust's recovery read every changelog partition to its fetch high watermark."""
    from faust.transport.drivers import aiokafka as driver

    thread = driver.AIOKafkaConsumerThread
    original = getattr(thread._highwaters, "__wrapped__", thread._highwaters)
    # The list Faust's own consumer connects to.
    servers = driver.server_list(app.conf.broker, driver.Transport.default_port)

    async def highwaters(self: Any, partitions: Any) -> Any:
        listed = await original(self, partitions)
        if self.consumer.in_transaction:
            return listed  # last stable offsets: not ListOffsets' latest
        return await logread.true_ends(servers, listed)

    highwaters.__wrapped__ = original  # type: ignore[attr-defined]
    thread._highwaters = highwaters  # type: ignore[method-assign]


def install(app: faust.App, extra_topics: Iterable[str] = ()) -> None:
    extra = list(extra_topics)
    recover_to_true_end(app)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _prime(sender: Any, *args: Any, **kwargs: Any) -> None:
        names = [t.changelog_topic.get_topic_name() for t in app.tables.values()] + extra
        await prime_producer_metadata(app, names)
