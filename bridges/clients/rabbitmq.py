"""RabbitMQ client: the namespaced topology, confirmed publishes, and consumers that can pause.

Topology (declared idempotently on connect, and for each route a reload adds; ``ns`` is ``settings.namespace``)::

    {ns}.work         direct exchange; routing key "{task}.{model}"
      -> {ns}.work.{task}.{model}   durable, x-max-priority 2, dead-letters to {ns}.dlx
    {ns}.dlx          fanout exchange -> {ns}.dead-letters (durable)
    {ns}.results      durable queue of result events (default exchange)

Every publish is persistent and waits for the broker's confirm. A publish that
is not confirmed raises :class:`PublishError`; the caller retries the whole
batch. A retry can duplicate messages whose confirm was lost, which is safe
because every consumer downstream is idempotent by request id.

A results message carries one ``ResultEvent`` as JSON (``application/json``,
header ``user_id``), or several as one message confirmed once
(:data:`RESULTS_BATCH_TYPE`: one JSON object a line, headers ``events`` (the
count) and ``user_ids`` (in line order)); :func:`result_bodies` splits either.

A dead letter's body is the original request's bytes (so ``redrive`` can
re-publish it as is); the failure travels in the headers ``error`` and
``history`` (JSON strings) and ``attempts``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
)
from aiormq.abc import ChannelFrame
from mode import Service
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from inferstream.errors import InferstreamError
from inferstream.route_watch import RouteWatcher
from inferstream.settings import Settings
from schemas.records import PRIORITY_LEVEL, InferenceRequest, ResultEvent

__all__ = [
    "AMQP_ERRORS",
    "RESULTS_BATCH_TYPE",
    "TRACE_HEADER",
    "TRACE_LIST_HEADER",
    "Consumer",
    "InboxConsumer",
    "Outgoing",
    "PublishError",
    "RabbitClient",
    "UnknownRoute",
    "publish_batch",
    "result_bodies",
    "result_count",
]

log = logging.getLogger(__name__)

MAX_PRIORITY = max(PRIORITY_LEVEL.values())
# What a lost connection or channel raises from aio-pika/aiormq (ChannelInvalidStateError is a RuntimeError).
AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
    asyncio.TimeoutError,
)
# A coroutine function: aio-pika 10 wraps a plain one in a coroutine that warns on every call, formatting
# the callback's repr (for a bound Queue.put_nowait, every message waiting in the queue: measured, reverted).
MessageCallback = Callable[[AbstractIncomingMessage], Awaitable[None]]
# Several result events in one message: one JSON object a line (orjson never writes a raw newline).
RESULTS_BATCH_TYPE = "application/x-ndjson"
# W3C trace context (inferstream.tracing): one value on a work or single-result message, a list in line order on a batch.
TRACE_HEADER = "traceparent"
TRACE_LIST_HEADER = "traceparents"
Properties = spec.Basic.Properties
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def result_bodies(message: AbstractIncomingMessage) -> list[bytes]:
    """The ``ResultEvent`` JSON bodies a results message carries (one, or a batch's lines)."""
    if message.content_type == RESULTS_BATCH_TYPE:
        return message.body.split(b"\n")
    return [message.body]


def result_count(message: AbstractIncomingMessage) -> int:
    """How many events a results message carries, from its ``events`` header (1 without one)."""
    if message.content_type != RESULTS_BATCH_TYPE:
        return 1
    count = (message.headers or {}).get("events")
    return count if isinstance(count, int) and count > 0 else message.body.count(b"\n") + 1


class PublishError(InferstreamError):
    """One or more messages were not confirmed (nack, unroutable, timeout, connection down).

    Retry the whole call; ``request_ids`` are the ones known to have failed.
    """

    def __init__(self, message: str, *, request_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.request_ids = list(request_ids)


class UnknownRoute(InferstreamError):
    """A request names a task and model with no work queue: a configuration error, not retryable."""

    def __init__(self, request_id: str, route: str) -> None:
        super().__init__(f"no work queue for route {route!r} (request {request_id})")
        self.request_id = request_id
        self.route = route


def _header_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _work_headers(req: InferenceRequest, trace: str | None) -> dict[str, Any]:
    headers: dict[str, Any] = {"user_id": req.user_id, "task": req.task, "model": req.model}
    if trace is not None:
        headers[TRACE_HEADER] = trace
    return headers


class Outgoing(NamedTuple):
    """One message for :func:`publish_batch`."""

    exchange: str  # "" for the default exchange
    routing_key: str
    body: bytes
    properties: Properties


def _forget_message_id(channel: aiormq.Channel, message_id: str, delivery_tag: int) -> None:
    if channel.message_id_delivery_tag.get(message_id) == delivery_tag:
        del channel.message_id_delivery_tag[message_id]


async def publish_batch(
    robust: AbstractRobustChannel, messages: Sequence[Outgoing], timeout: float
) -> list[BaseException | None]:
    """Publish ``messages`` (persistent, mandatory) as one write and wait for their confirms.

    Returns each message's outcome in order: None once the broker confirmed it, else the
    error (a nack, a return of an unroutable message, the channel's loss, a timeout). An
    error before anything was sent (no channel) is raised.

    Work-around of aiormq 7.2's per-message cost: ``Channel.basic_publish`` holds the
    channel lock until its writer task has written the message (a drain future per
    message), so concurrent publishes go out one event-loop trip and one socket write
    each (and RabbitMQ reads each alone). Micro-benchmark (/tmp/h4mb/pub.py: 10,000
    persistent, mandatory, confirmed publishes to a priority queue in batches of 64):
    aio-pika's ``Exchange.publish`` gathered 191-219 us CPU per message in the client and
    174-227 us in RabbitMQ; here 59 us and 106-108 us. Each message is registered in
    aiormq's own confirm bookkeeping exactly as ``basic_publish`` registers it (the
    channel's ``delivery_tag`` counter, ``confirmations`` future, ``message_id_delivery_tag``
    for returns; under the channel lock), so aiormq's handling of acks (multiple or not),
    nacks, returns (``on_return_raises``) and channel loss (``reject_all``) resolves them
    as it resolves its own; only the frames of the batch are written in one buffer.
    """
    if not messages:
        return []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    confirmations: list[tuple[int, str, asyncio.Future[Any]]] = []
    async with asyncio.timeout(timeout):
        if robust.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{robust!r} closed")
        channel = await robust.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)
        if not channel.publisher_confirms:
            raise RuntimeError("publish_batch needs a channel with publisher confirms")
        async with channel.lock:
            if channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
            frames: list[Any] = []
            first_tag = channel.delivery_tag + 1
            try:
                for message in messages:
                    channel.delivery_tag += 1
                    tag = channel.delivery_tag
                    message_id = message.properties.message_id
                    assert message_id, "a message_id is what a returned message is matched by"
                    confirmation = channel.create_future()
                    channel.confirmations[tag] = confirmation
                    channel.message_id_delivery_tag[message_id] = tag
                    confirmations.append((tag, message_id, confirmation))
                    body, size = message.body, channel.max_content_size
                    exchange, key = message.exchange, message.routing_key
                    frames.append(
                        spec.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True)
                    )
                    frames.append(ContentHeader(body_size=len(body), properties=message.properties))
                    frames.extend(
                        ContentBody(body[i : i + size]) for i in range(0, len(body), size)
                    )
                payload = ChannelFrame.marshall(channel.number, frames)
                await channel.write_queue.put(payload)
            except BaseException:
                # Not sent: the broker never saw these tags; give them back while the lock is held.
                channel.delivery_tag = first_tag - 1
                for tag, message_id, confirmation in confirmations:
                    channel.confirmations.pop(tag, None)
                    _forget_message_id(channel, message_id, tag)
                    confirmation.cancel()
                raise
    futures = [c for _, _, c in confirmations]
    try:
        await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
    finally:
        for tag, message_id, confirmation in confirmations:
            if not confirmation.done():
                confirmation.cancel()  # aiormq ignores a late confirm of a cancelled future
            _forget_message_id(channel, message_id, tag)
    outcomes: list[BaseException | None] = []
    for confirmation in futures:
        if confirmation.cancelled():
            outcomes.append(TimeoutError(f"not confirmed within {timeout:.1f}s"))
        elif (exc := confirmation.exception()) is not None:
            outcomes.append(exc)
        elif isinstance(confirmation.result(), spec.Basic.Ack):
            outcomes.append(None)
        else:  # returned (a channel without on_return_raises): not delivered
            outcomes.append(RuntimeError(f"returned by the broker: {confirmation.result()!r}"))
    return outcomes


class Consumer:
    """One queue consumed on its own channel (so its prefetch is its own), with pause and resume."""

    def __init__(self, channel: AbstractRobustChannel, queue: AbstractQueue, callback: MessageCallback) -> None:
        self.channel = channel
        self.queue = queue
        self._callback = callback
        self._tag: str | None = None

    @property
    def consuming(self) -> bool:
        return self._tag is not None

    async def resume(self) -> None:
        if self._tag is None:
            self._tag = await self.queue.consume(self._callback, no_ack=False)

    async def pause(self) -> None:
        """Stop deliveries; messages already delivered stay unacked and can still be acked."""
        tag, self._tag = self._tag, None
        if tag is not None:
            await self.queue.cancel(tag)

    async def close(self) -> None:
        """Close the channel: the broker requeues whatever is still unacked."""
        try:
            await self.pause()
        except AMQP_ERRORS as exc:
            log.warning("cancelling consumer of %s failed: %r", self.queue.name, exc)
        if not self.channel.is_closed:
            await self.channel.close()


class RabbitClient(Service):
    """The one RabbitMQ connection of a worker; connects lazily on first use."""

    def __init__(
        self,
        settings: Settings,
        *,
        routes: RouteWatcher | None = None,
        publish_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        # Which routes have work queues: the watcher's (current and retired); without one, the settings'.
        self.route_watcher = routes
        self._fixed_routes = None if routes is not None else frozenset(
            (task, model) for task, models in settings.model_routes.items() for model in models
        )
        self._declared: set[tuple[str, str]] = set()
        self.publish_timeout_s = publish_timeout_s
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._work_exchange: AbstractRobustExchange | None = None
        self._dlx: AbstractRobustExchange | None = None

    # ---- names ---------------------------------------------------------
    @property
    def ns(self) -> str:
        return self.settings.namespace

    @property
    def work_exchange_name(self) -> str:
        return f"{self.ns}.work"

    @property
    def dlx_name(self) -> str:
        return f"{self.ns}.dlx"

    @property
    def dead_letter_queue_name(self) -> str:
        return f"{self.ns}.dead-letters"

    @property
    def results_queue_name(self) -> str:
        return f"{self.ns}.results"

    def work_queue_name(self, task: str, model: str) -> str:
        return f"{self.ns}.work.{task}.{model}"

    @staticmethod
    def routing_key(task: str, model: str) -> str:
        return f"{task}.{model}"

    def routes(self) -> list[tuple[str, str]]:
        """Every ``(task, model)`` with a work queue: the route watcher's served routes (or ``settings.models``)."""
        if self.route_watcher is not None:
            return [r.key for r in self.route_watcher.served()]
        return [(task, model) for task, models in self.settings.model_routes.items() for model in models]

    def route_keys(self) -> frozenset[tuple[str, str]]:
        """The same as a set, without building it per call."""
        if self.route_watcher is not None:
            self.route_watcher.table  # noqa: B018 - loads the routes on first use
            return self.route_watcher.served_keys
        assert self._fixed_routes is not None
        return self._fixed_routes

    def all_queue_names(self) -> list[str]:
        work = [self.work_queue_name(t, m) for t, m in self.routes()]
        return [*work, self.dead_letter_queue_name, self.results_queue_name]

    # ---- lifecycle -----------------------------------------------------
    async def on_start(self) -> None:
        await self.connect()

    async def on_stop(self) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed and self._channel is not None

    async def connect(self) -> AbstractRobustChannel:
        """Open the connection and declare the topology once; later calls return the channel."""
        async with self._lock:
            if self._channel is not None:
                return self._channel
            connection = await aio_pika.connect_robust(
                self.settings.rabbitmq_url, client_properties={"connection_name": f"inferstream:{self.ns}"}
            )
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                await self._declare(channel)
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel
            log.info("RabbitMQ connected, namespace %s, %d work queues", self.ns, len(self.routes()))
            return channel

    async def _declare(self, channel: AbstractRobustChannel) -> None:
        # Declared on the robust channel, so they are declared again after a reconnect.
        self._work_exchange = await channel.declare_exchange(
            self.work_exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._dlx = await channel.declare_exchange(self.dlx_name, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(self.dead_letter_queue_name, durable=True)
        await dead.bind(self._dlx, routing_key="")
        await channel.declare_queue(self.results_queue_name, durable=True)
        self._declared = set()
        await self._declare_work_queues(channel, self.routes())

    async def _declare_work_queues(self, channel: AbstractRobustChannel, keys: Sequence[tuple[str, str]]) -> None:
        assert self._work_exchange is not None
        for task, model in keys:
            if (task, model) in self._declared:
                continue
            queue = await channel.declare_queue(
                self.work_queue_name(task, model),
                durable=True,
                arguments={"x-max-priority": MAX_PRIORITY, "x-dead-letter-exchange": self.dlx_name},
            )
            await queue.bind(self._work_exchange, routing_key=self.routing_key(task, model))
            self._declared.add((task, model))

    async def declare_routes(self, keys: Sequence[tuple[str, str]] | None = None) -> None:
        """Declare the work queues of ``keys`` (default: every route) that this connection has not declared.

        Routes added by a reload get their queues here; the robust channel declares them again after a reconnect.
        """
        channel = await self.connect()
        wanted = self.routes() if keys is None else list(keys)
        if any(k not in self._declared for k in wanted):
            async with self._lock:
                await self._declare_work_queues(channel, wanted)

    async def close(self) -> None:
        async with self._lock:
            connection, self._connection, self._channel = self._connection, None, None
            self._work_exchange = self._dlx = None
            if connection is not None and not connection.is_closed:
                await connection.close()

    async def _connection_ready(self) -> AbstractRobustConnection:
        await self.connect()
        assert self._connection is not None
        return self._connection

    # ---- publishing ----------------------------------------------------
    async def _publish_all(self, messages: Sequence[Outgoing]) -> list[BaseException | None]:
        """Publish ``messages`` in one write on the client's channel; each one's outcome (None: confirmed)."""
        channel = self._channel
        assert channel is not None
        try:
            return await publish_batch(channel, messages, self.publish_timeout_s)
        except AMQP_ERRORS as exc:  # nothing sent (the channel is away): every message failed
            return [exc] * len(messages)

    async def publish_requests(self, reqs: Sequence[InferenceRequest], traces: Sequence[str] | None = None) -> None:
        """Publish a batch to the work queues in one write and wait for every confirm.

        ``traces`` (tracing on): each request's W3C ``traceparent``, sent as a header.

        Raises :class:`PublishError` if any message was not confirmed: retry the
        whole batch (duplicates are fine downstream). :class:`UnknownRoute` is
        raised before anything is sent if a request's route has no queue.
        """
        known = self.route_keys()
        for req in reqs:
            if (req.task, req.model) not in known:
                raise UnknownRoute(req.request_id, self.routing_key(req.task, req.model))
        try:
            await self.connect()
            if any((req.task, req.model) not in self._declared for req in reqs):
                await self.declare_routes(sorted({(str(req.task), req.model) for req in reqs}))  # a reload added it
        except AMQP_ERRORS as exc:
            raise PublishError(f"RabbitMQ unreachable: {exc!r}", request_ids=[r.request_id for r in reqs]) from exc
        exchange = self.work_exchange_name
        normal = PRIORITY_LEVEL["normal"]
        outcomes = await self._publish_all([
            Outgoing(
                exchange, self.routing_key(req.task, req.model), req.to_bytes(),
                Properties(
                    delivery_mode=PERSISTENT, message_id=req.request_id,
                    priority=PRIORITY_LEVEL.get(req.priority, normal), content_type="application/json",
                    headers=_work_headers(req, traces[i] if traces is not None else None),
                ),
            )
            for i, req in enumerate(reqs)
        ])  # fmt: skip
        self._raise_unconfirmed([r.request_id for r in reqs], outcomes)

    @staticmethod
    def _raise_unconfirmed(ids: Sequence[str], outcomes: Sequence[object]) -> None:
        failed = [(rid, out) for rid, out in zip(ids, outcomes, strict=True) if isinstance(out, BaseException)]
        if not failed:
            return
        for _, out in failed:
            # A bug (not a broker problem) must surface as itself, not as a retryable error.
            if not isinstance(out, AMQP_ERRORS):
                raise out
        first = failed[0][1]
        raise PublishError(
            f"{len(failed)} of {len(ids)} messages not confirmed: {first!r}", request_ids=[rid for rid, _ in failed]
        ) from first  # type: ignore[misc]

    async def _publish_one(
        self,
        exchange_name: str,
        body: bytes,
        routing_key: str,
        rid: str,
        *,
        content_type: str = "application/json",
        headers: dict[str, Any] | None = None,
    ) -> None:
        try:
            await self.connect()
            (outcome,) = await self._publish_all([
                Outgoing(
                    exchange_name, routing_key, body,
                    Properties(delivery_mode=PERSISTENT, message_id=rid, content_type=content_type, headers=headers),
                )
            ])  # fmt: skip
        except AMQP_ERRORS as exc:
            raise PublishError(f"not confirmed: {exc!r}", request_ids=[rid]) from exc
        self._raise_unconfirmed([rid], [outcome])

    async def publish_result(self, event: ResultEvent, trace: str | None = None) -> None:
        """Publish one status change to the results queue; returns once confirmed."""
        headers: dict[str, Any] = {"user_id": event.user_id, "status": event.status}
        if trace is not None:
            headers[TRACE_HEADER] = trace
        await self._publish_one("", event.to_bytes(), self.results_queue_name, event.request_id, headers=headers)

    async def publish_results(self, events: Sequence[ResultEvent], traces: Sequence[str | None] | None = None) -> None:
        """Publish status changes as one message, confirmed once (one event keeps the single format).

        ``traces`` (tracing on): each event's W3C ``traceparent`` ("" for none), in line order.
        Raises :class:`PublishError` naming every event's request when it is not confirmed.
        """
        if len(events) == 1:
            await self.publish_result(events[0], traces[0] if traces is not None else None)
            return
        ids = [e.request_id for e in events]
        headers: dict[str, Any] = {"events": len(events), "user_ids": [e.user_id for e in events]}
        if traces is not None:
            headers[TRACE_LIST_HEADER] = [t or "" for t in traces]
        try:
            await self._publish_one(
                "", b"\n".join(e.to_bytes() for e in events), self.results_queue_name,
                f"{ids[0]}+{len(ids) - 1}", content_type=RESULTS_BATCH_TYPE, headers=headers,
            )  # fmt: skip
        except PublishError as exc:
            raise PublishError(str(exc), request_ids=ids) from exc.__cause__

    async def publish_dead_letter(self, req: InferenceRequest, history: list[dict[str, Any]], error: dict[str, Any]) -> None:
        """Publish a request that failed for good to the dead-letter exchange; returns once confirmed."""
        await self._publish_one(
            self.dlx_name, req.to_bytes(), "", req.request_id,
            headers={
                "user_id": req.user_id, "task": req.task, "model": req.model,
                "attempts": len(history),
                "error": orjson.dumps(error).decode(),
                "history": orjson.dumps(history).decode(),
            },
        )

    # ---- consuming -----------------------------------------------------
    async def consumer(self, queue_name: str, callback: MessageCallback, *, prefetch: int, start: bool = True) -> Consumer:
        """A consumer of an existing queue on a channel of its own, manual ack."""
        connection = await self._connection_ready()
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        consumer = Consumer(channel, queue, callback)
        if start:
            await consumer.resume()
        return consumer

    async def get(self, queue_name: str, *, ack: bool = True) -> AbstractIncomingMessage | None:
        """One message from a queue, or None when it is empty (tests, redrive)."""
        connection = await self._connection_ready()
        async with connection.channel() as channel:
            queue = await channel.get_queue(queue_name, ensure=True)
            message = await queue.get(fail=False, no_ack=False)
            if message is not None and ack:
                await message.ack()
            return message

    async def message_count(self, queue_name: str) -> int:
        """Ready (not unacked) messages in a queue."""
        connection = await self._connection_ready()
        async with connection.channel() as channel:
            queue = await channel.declare_queue(queue_name, passive=True)
            count = queue.declaration_result.message_count
            return int(count or 0)

    @staticmethod
    def dead_letter_info(message: AbstractIncomingMessage) -> dict[str, Any]:
        """Decode a dead letter: the request, the error and the attempt history."""
        headers = message.headers or {}
        return {
            "request": orjson.loads(message.body),
            "error": orjson.loads(_header_text(headers["error"])) if "error" in headers else None,
            "history": orjson.loads(_header_text(headers["history"])) if "history" in headers else [],
            "attempts": headers.get("attempts"),
        }

    # ---- test and admin helpers ---------------------------------------
    async def delete_namespace(self, extra_routes: Iterable[tuple[str, str]] = ()) -> None:
        """Delete this namespace's queues and exchanges, and the work queues of ``extra_routes`` (tests clean up with it)."""
        connection = await self._connection_ready()
        async with connection.channel() as channel:
            extra = [self.work_queue_name(task, model) for task, model in extra_routes]
            for name in dict.fromkeys([*self.all_queue_names(), *extra]):
                await channel.queue_delete(name)
            for name in (self.work_exchange_name, self.dlx_name):
                await channel.exchange_delete(name)


class InboxConsumer(Service):
    """A service that consumes one queue (on a channel of its own) into ``_inbox``; subclasses drain it.

    Manual acks are the subclass's; stopping closes the channel, which hands
    every message not yet acked back to the broker.
    """

    def __init__(self, rabbit: RabbitClient, queue_name: str, *, prefetch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rabbit = rabbit
        self.queue_name = queue_name
        self.prefetch = prefetch
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consumer: Consumer | None = None

    async def on_start(self) -> None:
        self._consumer = await self.rabbit.consumer(self.queue_name, self._inbox.put, prefetch=self.prefetch)

    async def on_stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await consumer.close()
            except AMQP_ERRORS as exc:
                log.warning("closing the consumer of %s failed: %r", self.queue_name, exc)
