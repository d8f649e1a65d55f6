"""Streamed output of a generation: each delta from the model to Redis, with its character offset.

The ML worker calls the model with ``stream: true`` when a generate request asks for it
(``params.stream``); :class:`OutputStream` turns the pieces into ``(delta, offset)`` pairs and
hands them to the process's :class:`OutputSink` (``RedisClient.publish_output``: APPEND to the
text so far and PUBLISH on the request's events channel, one round trip). Deltas are ephemeral:
the final text still travels in the terminal event through the log.

Offsets never go back. A retry, or a redelivery to another worker, generates from the start
again: its text up to what was already published is not sent twice, only what goes beyond it
(the reference model is deterministic; with another, the final ``result.text`` is the
authority). A Redis that fails stops the deltas of that request, never the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from inferstream.errors import InferstreamError

__all__ = ["OutputSink", "OutputStream", "install", "sink", "wants_stream"]

log = logging.getLogger(__name__)


class OutputSink(Protocol):
    async def publish_output(self, request_id: str, delta: str, offset: int) -> None: ...

    async def output_so_far(self, request_id: str) -> str: ...


_sink: OutputSink | None = None


def install(new: OutputSink | None) -> None:
    """Set the process's sink (the composition root does, with its Redis client); None: no deltas."""
    global _sink
    _sink = new


def sink() -> OutputSink | None:
    return _sink


def wants_stream(task: str, params: dict[str, object] | None) -> bool:
    """Whether a request asked for streamed output (only generations stream)."""
    return task == "generate" and bool(params) and params.get("stream") is True  # type: ignore[union-attr]


class OutputStream:
    """One request's deltas: ``offset`` counts the characters published so far.

    One publish at a time: pieces that arrive while one is on its way go out together in the
    next (under load, fewer and larger deltas instead of a queue of round trips), and the model's
    stream is read meanwhile instead of waiting for Redis.
    """

    __slots__ = ("request_id", "_sink", "sent", "_seen", "_broken", "_resumed", "_pending", "_flusher")

    def __init__(self, request_id: str, out: OutputSink) -> None:
        self.request_id = request_id
        self._sink = out
        self.sent = 0  # characters handed on (by this worker or an earlier delivery)
        self._seen = 0  # characters of the current attempt
        self._broken = False
        self._resumed = False
        self._pending: list[str] = []
        self._flusher: asyncio.Task[None] | None = None

    async def resume(self) -> None:
        """Start after what an earlier delivery of this request published (once per job)."""
        if self._resumed:
            return
        self._resumed = True
        try:
            self.sent = len(await self._sink.output_so_far(self.request_id))
        except InferstreamError as exc:
            log.warning("streamed output of %s: text so far unknown (%s); not streaming", self.request_id, exc)
            self._broken = True

    def new_attempt(self) -> None:
        self._seen = 0

    async def on_delta(self, text: str) -> None:
        start = self._seen
        self._seen += len(text)
        if self._broken or self._seen <= self.sent:
            return  # a repeat of text already published (a retry), or Redis gave up on us
        if start < self.sent:
            text, start = text[self.sent - start :], self.sent
        self.sent = self._seen
        self._pending.append(text)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(start))

    async def drain(self) -> None:
        """Wait until every delta handed on is published (before the terminal event goes out)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self) -> None:
        """The job ended another way (cancelled): drop what is not sent yet."""
        self._pending.clear()
        if self._flusher is not None:
            self._flusher.cancel()

    async def _flush(self, offset: int) -> None:
        while self._pending and not self._broken:
            delta = "".join(self._pending)
            self._pending.clear()
            try:
                await self._sink.publish_output(self.request_id, delta, offset)
            except InferstreamError as exc:
                log.warning("streamed output of %s stopped: %s", self.request_id, exc)
                self._broken = True
                return
            offset += len(delta)
