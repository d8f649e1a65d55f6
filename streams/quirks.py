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

``deliver_eagerly``: Faust's consumer hands each fetched message to the
conductor through mode's ``Service.wait_first(callback(message),
suspend_flow.wait())``, which wraps the callback, the suspend event and the
consumer's stopped and crashed events in four new tasks, waits for the first,
and cancels the other three: about 15 event-loop callbacks per message, while
the callback almost always finishes without suspending (it decodes the record
and puts the event in each agent's queue; 94% of 20,000 messages in the
micro-benchmark). The consumer's ``wait_first`` now steps the callback once by
hand; if it finishes, that is the answer (no task, no loop trip); if it
suspends (a full agent queue, flow control during a rebalance), the rest of it
runs in a task raced against the same events by mode's own ``wait_first``, as
before.

``yield_every``: Faust's Cython stream iterator (``faust/_cython/streams.pyx``,
``StreamIterator.next``) begins every event with ``await sleep(0)``, a trip
through the event loop per event per agent, even when the agent's queue holds
more events. The name ``sleep`` in that module now resolves to one that yields
once every ``STREAM_YIELD_EVERY`` (64) calls: an agent still lets the loop run
at least every 64 events, and whenever its queue is empty it waits on the
queue as before (Faust's own drain loop yields every 100 messages).

``LeanMonitor``: Faust's default ``Monitor`` sensor records stats on every
message in and out, every stream event in and out (two dictionaries, a counter
keyed by the stream's and the task's ``str``, two clock reads, a state dict),
every send and every table read or write; only Faust's web stats pages read
them, and those are off. The lean monitor keeps what Faust itself reads (the
per-partition inbound time its stall detector checks, commit and end offsets)
and skips the rest.

``cython_optimizations=True`` (a Faust setting, not a patch; see
:func:`streams.application.build_app`): faust-streaming 0.15.3 ships two
repaired Cython fast paths behind it, off by default: the conductor decodes a
record once for every agent reading its topic with the same key and value
types (the pure-Python conductor always did; the Cython one decoded it again
per agent: the forward and sink-requests agents read the requests topic,
settle and sink-results the results topic), and the stream iterator takes an
event already in its queue without awaiting the queue. Our agents never
modify an event's value (they derive copies), so sharing it is safe.

Measured with ``python -m bench.faust_events`` (20,000 records read from a
backlog by two read-ahead agents, uvloop, one process): 126, 136 and 79 us of
CPU per consumed event with none of the four (``--variant before``), 49, 41
and 40 us with all four, alternated. One at a time (one run each, in a row,
under the benchmark lock): none 80.1 us, deliver_eagerly 65.2,
yield_every 74.8, LeanMonitor 77.0, cython_optimizations 63.2, all four 28.8
(each small one weighs more once the large ones are gone). ``bench.cpu --topology split``,
alternated in clean clones (a, b, a, b): pipeline worker 4.43 and 5.05 ms per
request before, 3.16 and 3.02 after; all processes 9.08 and 10.56 ms before,
6.70 and 6.34 after (PostgreSQL and Tansu less too: the agents keep up, so
their batches are larger); 182 and 154 requests/s before, 241 and 253 after.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator, Iterable
from time import monotonic
from typing import Any, cast

import faust
from faust.sensors import Monitor
from faust.types import TP, EventT, StreamT
from mode import ServiceT
from mode.services import WaitResults

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


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """The rest of ``coro``, which was stepped once by hand and yielded ``yielded`` (a future it waits on,
    or None for a bare yield): the awaiting task first waits on that, then ``coro`` continues as if it
    had been a task's from the start (a cancellation is thrown into it)."""
    try:
        yield yielded
    except BaseException as exc:
        try:
            again = coro.throw(exc)
        except StopIteration as done:
            return done.value
        return (yield from _resumed(coro, again))
    return (yield from coro)


async def _continued(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    return await _resumed(coro, yielded)


def deliver_eagerly() -> None:
    """Make Faust's consumer run each message's conductor callback directly when it does not suspend,
    instead of in a task raced against three others (``Consumer.wait_first``, called per message by
    ``Consumer._drain_messages``)."""
    from faust.transport.consumer import Consumer

    original = getattr(Consumer.wait_first, "__wrapped__", Consumer.wait_first)

    async def wait_first(self: Any, *coros: Any, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if not asyncio.iscoroutine(first) or self._stopped.is_set() or self._crashed.is_set():
            return await original(self, *coros, timeout=timeout)
        try:
            yielded = first.send(None)
        except BaseException as ended:  # finished (StopIteration) or raised: the others never start
            for other in coros[1:]:
                if asyncio.iscoroutine(other):
                    other.close()  # never started: closing it only avoids "never awaited"
            if isinstance(ended, StopIteration):
                return WaitResults([first], [ended.value], False)
            raise
        return await original(self, _continued(first, yielded), *coros[1:], timeout=timeout)

    wait_first.__wrapped__ = original  # type: ignore[attr-defined]
    Consumer.wait_first = wait_first  # type: ignore[method-assign]


STREAM_YIELD_EVERY = 64


def yield_every(n: int = STREAM_YIELD_EVERY) -> None:
    """Make Faust's Cython stream iterator yield to the event loop once every ``n`` events, not before each."""
    from faust._cython import streams as cstreams

    original = getattr(cstreams.sleep, "__wrapped__", cstreams.sleep)
    calls = 0

    async def sleep(delay: float, result: Any = None) -> Any:
        nonlocal calls
        calls += 1
        if delay or calls >= n:
            calls = 0
            return await original(delay, result)
        return result

    sleep.__wrapped__ = original  # type: ignore[attr-defined]
    cstreams.sleep = sleep


class LeanMonitor(Monitor):
    """Faust's Monitor without the per-message and per-event statistics nothing here reads; it keeps
    ``stream_inbound_time``, which Faust's stall detector (``verify_event_path``) checks."""

    def on_message_in(self, tp: TP, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(
        self, tp: TP, offset: int, stream: StreamT, event: EventT
    ) -> dict[str, Any] | None:
        self.stream_inbound_time[tp] = monotonic()
        return None  # no state: on_stream_event_out has nothing to time

    def on_message_out(self, tp: TP, offset: int, message: Any) -> None:
        pass

    def on_send_initiated(
        self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
    ) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        pass

    def on_table_get(self, table: Any, key: Any) -> None:
        pass

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        pass

    def on_table_del(self, table: Any, key: Any) -> None:
        pass


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
