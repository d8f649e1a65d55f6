"""Results bridge: moves result events from the RabbitMQ results queue into the log, in batches.

Messages are taken with a large prefetch, gathered for up to ``batch_size``
events or ``batch_wait_ms``, handed to ``produce`` (which returns only when
the log acknowledged every record), and only then acked, all at once with
``multiple=True``. If ``produce`` raises, nothing is acked and the same batch
is retried (:data:`inferstream.retrying.LOG_PRODUCE`); a bridge that dies leaves them unacked and RabbitMQ
redelivers them. Duplicates in the log are fine: its consumers are idempotent.
Bodies pass through untouched, one log record per event: a message carrying
several events (ML workers publish the events that finish together as one,
``bridges.clients.rabbitmq.RESULTS_BATCH_TYPE``) is split into one record per
line, keyed by its ``user_ids`` header; a single-event message (older workers,
the dead-letter path) is keyed by its ``user_id`` header.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from mode import Service
from prometheus_client import Counter
from tenacity import RetryCallState

from bridges.clients.rabbitmq import (
    AMQP_ERRORS,
    RESULTS_BATCH_TYPE,
    InboxConsumer,
    RabbitClient,
    result_bodies,
    result_count,
)
from inferstream import tracing
from inferstream.retrying import LOG_PRODUCE, any_error, failure, next_sleep
from inferstream.settings import Settings

__all__ = ["Produce", "ResultsBridge", "message_key", "message_records"]

log = logging.getLogger(__name__)

Produce = Callable[[list[tuple[bytes, bytes]]], Awaitable[None]]
BRIDGED = Counter("inferstream_results_bridged_total", "Result events moved from RabbitMQ to the log.")
PRODUCE_FAILURES = Counter("inferstream_results_bridge_failures_total", "Failed produce calls of the results bridge.")


def _key(value: Any) -> bytes | None:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return None


def _body_key(body: bytes, message_id: str | None) -> bytes:
    try:
        return str(orjson.loads(body)["user_id"]).encode()
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.error("result message %s has no user_id; keyed by empty bytes", message_id)
        return b""


def message_key(message: AbstractIncomingMessage) -> bytes:
    """The log key of a single-event result: its ``user_id`` header (or, without one, its body's field)."""
    key = _key((message.headers or {}).get("user_id"))
    return key if key is not None else _body_key(message.body, message.message_id)


def message_records(message: AbstractIncomingMessage) -> list[tuple[bytes, bytes]]:
    """One ``(key, event body)`` per event the message carries, in order."""
    bodies = result_bodies(message)
    if len(bodies) == 1 and message.content_type != RESULTS_BATCH_TYPE:
        return [(message_key(message), message.body)]
    header = (message.headers or {}).get("user_ids")
    if isinstance(header, list | tuple) and len(header) == len(bodies):
        keys = [_key(value) for value in header]
    else:  # a header lost or mangled on the way: every event carries its user_id
        keys = [None] * len(bodies)
    return [
        (key if key is not None else _body_key(body, message.message_id), body)
        for key, body in zip(keys, bodies, strict=True)
    ]


class ResultsBridge(InboxConsumer):
    """RabbitMQ ``{ns}.results`` -> ``produce`` -> ack."""

    def __init__(
        self,
        settings: Settings,
        rabbit: RabbitClient,
        produce: Produce,
        *,
        batch_size: int = 500,
        batch_wait_ms: float = 5.0,
        prefetch: int = 500,
        retry_base_s: float = LOG_PRODUCE.base_s,
        retry_max_s: float = LOG_PRODUCE.cap_s,
        **kwargs: Any,
    ) -> None:
        super().__init__(rabbit, rabbit.results_queue_name, prefetch=max(prefetch, batch_size), **kwargs)
        self.settings = settings
        self.produce = produce
        self.batch_size = max(1, batch_size)
        self.batch_wait_s = batch_wait_ms / 1000
        self.retry = LOG_PRODUCE.tuned(retry_base_s, retry_max_s)
        self.moved = 0  # events

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        """Messages carrying up to ``batch_size`` events (at least one message)."""
        batch = [await self._inbox.get()]
        events = result_count(batch[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while events < self.batch_size:
            if not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
                events += result_count(batch[-1])
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._inbox.get(), remaining))
            except TimeoutError:
                break
            events += result_count(batch[-1])
        return batch

    @Service.task
    async def _bridge(self) -> None:
        while not self.should_stop:
            batch = await self._next_batch()
            if tracing.ENABLED:
                records = await self._produce_traced(batch)
            else:
                records = [record for m in batch for record in message_records(m)]
                await self._produce_until_done(records)
            try:
                await batch[-1].ack(multiple=True)
            except AMQP_ERRORS as exc:
                # The channel dropped: the broker redelivers these; the log side is idempotent.
                log.warning("could not ack %d bridged results: %r", len(batch), exc)
            self.moved += len(records)
            BRIDGED.inc(len(records))

    async def _produce_traced(self, batch: list[AbstractIncomingMessage]) -> list[tuple[bytes, bytes]]:
        """Produce with a span per event, under the context its message carries for it; each record's header names its span."""
        records: list[tuple[bytes, bytes]] = []
        spans = []
        for message in batch:
            found = message_records(message)
            for parent in tracing.line_contexts(message.headers, len(found)):
                spans.append(tracing.start(
                    "results bridge", parent, kind=tracing.SpanKind.CONSUMER,
                    attributes={"messaging.system": "rabbitmq", "messaging.destination.name": self.queue_name,
                                "inferstream.batch_size": len(found)},
                ))  # fmt: skip
            records += found
        token = tracing.RECORD_HEADERS.set([tracing.kafka_headers(s) for s in spans])
        try:
            await self._produce_until_done(records)
        except BaseException as exc:
            tracing.end_all(spans, exc)
            raise
        finally:
            tracing.RECORD_HEADERS.reset(token)
        tracing.end_all(spans)
        return records

    async def _produce_until_done(self, records: list[tuple[bytes, bytes]]) -> None:
        # produce is an injected boundary: whatever it raises is logged with its traceback and retried.
        def failed(state: RetryCallState) -> None:
            PRODUCE_FAILURES.inc()
            log.error(
                "producing %d results failed (attempt %d); retrying in %.2fs",
                len(records), state.attempt_number, next_sleep(state), exc_info=failure(state),
            )  # fmt: skip

        async for attempt in self.retry.retrying(any_error, before_sleep=failed):
            with attempt:
                await self.produce(records)
