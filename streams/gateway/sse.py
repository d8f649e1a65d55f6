"""Server-Sent Events for one request: pushed by the notification hub, polled from the store when Redis is away.

Each event is ``id: <rank>``, ``event: <status>``, ``data: <document JSON>``; the ids are the
status ranks (queued 1, dispatched 2, running 3, terminal 4), so they increase along the
lifecycle and ``Last-Event-ID`` says which states the client has seen. The stream sends only
states newer than the last id it sent, so no id is sent twice; states the client missed while
disconnected, or that were superseded before it heard of them, collapse into the current one
(a client that reconnects during ``running`` gets one ``running`` event, not ``dispatched``
first). It ends right after a terminal state.

Per client this costs the handler's own task, one in-process :class:`Subscription` and a timer:
no extra task and no Redis connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from bridges.redis import NotificationHub, Subscription
from inferstream.errors import InferstreamError
from schemas.documents import event_id
from schemas.records import STATUS_RANK, TERMINAL

log = logging.getLogger(__name__)

LoadDoc = Callable[[], Awaitable[dict[str, Any] | None]]
KEEP_ALIVE = b": keep-alive\n\n"
_TIMED_OUT: Any = object()


def parse_last_event_id(value: str | None) -> int:
    """The client's ``Last-Event-ID`` as a rank; anything unreadable means it has seen nothing."""
    if not value:
        return 0
    try:
        return max(0, int(value.strip()))
    except ValueError:
        return 0


def format_event(doc: dict[str, Any]) -> bytes:
    status = doc["status"]
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event_id(status),
        status.encode(),
        orjson.dumps(doc),
    )


class _Emitter:
    """Writes a state only if it is newer than everything already sent; remembers when it last wrote."""

    __slots__ = ("resp", "last_id", "written_at")

    def __init__(self, resp: web.StreamResponse, last_id: int) -> None:
        self.resp = resp
        self.last_id = last_id
        self.written_at = asyncio.get_running_loop().time()

    async def send(self, doc: dict[str, Any]) -> bool:
        """Send ``doc`` if it is news; True when the stream is over (the state is terminal)."""
        status = doc.get("status")
        if status not in STATUS_RANK:
            log.warning("ignoring a document with unknown status %r", status)
            return False
        rank = event_id(status)
        if rank > self.last_id:
            await self._write(format_event(doc))
            self.last_id = rank
        return status in TERMINAL

    async def keep_alive(self) -> None:
        await self._write(KEEP_ALIVE)

    async def _write(self, data: bytes) -> None:
        await self.resp.write(data)
        self.written_at = asyncio.get_running_loop().time()


async def _reload(load_doc: LoadDoc, request_id: str) -> dict[str, Any] | None:
    try:
        return await load_doc()
    except InferstreamError as exc:
        # The store is away for now; the next poll or notification tries again.
        log.warning("sse %s: could not load the current state: %s", request_id, exc)
        return None


async def stream_events(
    request: web.Request,
    *,
    request_id: str,
    load_doc: LoadDoc,
    hub: NotificationHub,
    heartbeat_s: float,
    poll_s: float,
) -> web.StreamResponse:
    """Stream a request's status changes until its terminal state (see the module docstring).

    The caller has authenticated the user and checked ownership. Errors of the first
    ``load_doc()`` propagate before any byte is sent, so they still become an HTTP error.
    """
    last_id = parse_last_event_id(request.headers.get("Last-Event-ID"))
    # Subscribe before reading the state: anything published after the read is then queued.
    sub = hub.subscribe(request_id)
    try:
        doc = await load_doc()
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await resp.prepare(request)
            emitter = _Emitter(resp, last_id)
            if doc is None or not await emitter.send(doc):
                await _pump(request, emitter, sub, load_doc, hub, heartbeat_s, poll_s)
        except ConnectionResetError:
            pass  # the client went away: nothing to report, the subscription is dropped below
    finally:
        hub.unsubscribe(sub)
    return resp


async def _pump(
    request: web.Request,
    emitter: _Emitter,
    sub: Subscription,
    load_doc: LoadDoc,
    hub: NotificationHub,
    heartbeat_s: float,
    poll_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    next_poll = loop.time() + poll_s
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        next_beat = emitter.written_at + heartbeat_s
        wake = next_beat if hub.healthy else min(next_beat, next_poll)
        item: dict[str, Any] | None = _TIMED_OUT
        try:
            async with asyncio.timeout_at(wake):
                item = await sub.get()
        except TimeoutError:
            pass
        if item is not _TIMED_OUT and item is not None and await emitter.send(item):
            return
        now = loop.time()
        # None from the hub: it (re)connected or lost Redis, or we fell behind: reload the state.
        if item is None or (not hub.healthy and now >= next_poll):
            next_poll = now + poll_s
            doc = await _reload(load_doc, sub.request_id)
            if doc is not None and await emitter.send(doc):
                return
        if now >= emitter.written_at + heartbeat_s:
            await emitter.keep_alive()
