"""Acks of one consumer channel, coalesced per event-loop tick, with ``multiple=True`` where it is safe.

A results message confirmed once releases many jobs in the same tick; each
sent its own ``basic.ack`` (a frame and a socket write each). Here the acks
requested in a tick go out together: one ``ack(T, multiple=True)`` for the
deliveries up to the low watermark (the highest tag T such that every delivery
on the channel up to T is finished), and an individual ack for each finished
delivery above it (an unfinished earlier one must never be covered).

Only :meth:`ack` is deferred. A nack or reject is sent at once through
:meth:`settle_now`, and its tag counts as finished only after it was sent, so
a multiple ack never reaches a delivery whose nack is still on its way. One
flush runs at a time: a tag acked individually counts as finished only once
that ack is written, so no later multiple ack can name it first (RabbitMQ
closes the channel on an ack of an unknown tag).

Delivery tags belong to a channel: when the robust connection reopens the
channel, tracking starts again on the new one, and acks of messages from the
old one are sent as they are (they fail; the broker already requeued them).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from bridges.clients.rabbitmq import AMQP_ERRORS
from workers import metrics

__all__ = ["Acks"]

log = logging.getLogger(__name__)


def _channel_of(message: AbstractIncomingMessage) -> Any:
    try:
        return message.channel
    except AMQP_ERRORS:  # closed: its deliveries are the broker's again
        return None


class Acks:
    """Delivery bookkeeping of one consumer channel; see the module docstring."""

    def __init__(self) -> None:
        self._channel: Any = None
        # Delivered on the current channel and not yet passed by the watermark; of those, the ones
        # settled already (acked alone, nacked, rejected).
        self._open: list[int] = []
        self._finished: set[int] = set()
        self._ready: dict[int, tuple[AbstractIncomingMessage, asyncio.Future[None]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.frames = 0  # ack frames sent (tests, metrics)

    @property
    def unsettled(self) -> int:
        return len(self._open) - len(self._finished)

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Record a delivery; call it before anything can settle a later one (first thing in the callback)."""
        tag = message.delivery_tag
        channel = _channel_of(message)
        if tag is None or channel is None:
            return
        if channel is not self._channel:
            self._channel, self._open, self._finished = channel, [], set()
        if self._open and tag < self._open[-1]:
            bisect.insort(self._open, tag)
        else:
            self._open.append(tag)

    def _tracked(self, message: AbstractIncomingMessage) -> bool:
        tag = message.delivery_tag
        return (
            tag is not None and self._channel is not None and _channel_of(message) is self._channel
        )

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack ``message`` with the others finished in this tick; returns once its ack is written."""
        if not self._tracked(message):
            await self._send(message.ack, message)
            metrics.ACK_FRAMES.inc()
            metrics.ACKS.inc()
            return
        tag = message.delivery_tag
        assert tag is not None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready[tag] = (message, waiter)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        await asyncio.shield(waiter)

    async def settle_now(
        self, message: AbstractIncomingMessage, *, requeue: bool = False, reject: bool = False
    ) -> None:
        """Nack (``requeue``) or reject ``message`` at once; its tag is finished once that is sent."""
        tracked = self._tracked(message)
        if reject:
            await self._send(lambda: message.reject(requeue=False), message)
        else:
            await self._send(lambda: message.nack(requeue=requeue), message)
        tag = message.delivery_tag
        if (
            tracked
            and tag is not None
            and _channel_of(message) is self._channel
            and tag in self._open
        ):
            self._finished.add(tag)

    @staticmethod
    async def _send(
        settle: Callable[[], Awaitable[None]], message: AbstractIncomingMessage
    ) -> None:
        try:
            await settle()
        except AMQP_ERRORS as exc:
            # The channel is gone: the broker already requeued the message; downstream is idempotent.
            log.warning("could not settle message %s: %r", message.message_id, exc)

    async def _flush(self) -> None:
        try:
            while self._ready:
                await asyncio.sleep(0)  # let the rest of the tick's acks arrive
                ready, self._ready = self._ready, {}
                await self._flush_once(ready)
        finally:
            self._flusher = None

    async def _flush_once(
        self, ready: dict[int, tuple[AbstractIncomingMessage, asyncio.Future[None]]]
    ) -> None:
        current = {t: entry for t, entry in ready.items() if _channel_of(entry[0]) is self._channel}
        # The watermark: pass every leading delivery that is finished or acked now.
        top: int | None = None
        passed = 0
        for tag in self._open:
            if tag in current:
                top = tag
            elif tag not in self._finished:
                break
            passed += 1
        for tag in self._open[:passed]:
            self._finished.discard(tag)
        del self._open[:passed]
        sends: list[tuple[AbstractIncomingMessage, bool]] = []
        if top is not None:
            covered = sum(1 for t in current if t <= top)
            sends.append((current[top][0], covered > 1))
        alone = [t for t in current if top is None or t > top]
        sends += [(current[t][0], False) for t in alone]
        # An old channel's: sent as they are (they fail; the broker requeued them).
        sends += [(entry[0], False) for t, entry in ready.items() if t not in current]
        try:
            await asyncio.gather(
                *(self._send(functools.partial(m.ack, multiple=mult), m) for m, mult in sends)
            )
            self.frames += len(sends)
            metrics.ACK_FRAMES.inc(len(sends))
            metrics.ACKS.inc(len(ready))
        finally:
            # Acked alone above the watermark: finished from now on, so a later watermark passes them.
            self._finished.update(t for t in alone if t in self._open)
            for _, waiter in ready.values():
                if not waiter.done():
                    waiter.set_result(None)
