"""Server-Sent Events for one request: pushed by the notification hub, polled from the store when Redis is away.

Each event is ``id: <rank>``, ``event: <status>``, ``data: <document JSON>``; the ids are the
status ranks (queued 1, dispatched 2, running 3, terminal 4), so they increase along the
lifecycle and ``Last-Event-ID`` says which states the client has seen. No id is sent twice on
one stream. A new stream starts with the current state; from then on it hears every status
change once, in order (the sink announces each status a batch went through).

A resumed stream (``Last-Event-ID: N``) first replays, in order, the events after N from the
history kept with the cached document (``RedisClient.history``), then goes live. When the
history cannot serve N (an id that is no number or beyond the terminal one, or no history
left: expired, evicted, Redis down) the stream sends one event with the current state whose
data carries ``"replayed": "snapshot"``: statuses in between may be missing. The same holds
when a live stream has to reload the state (the hub reconnected, the stream fell behind, or
polling) and finds it more than one step ahead. Fast work has no ``running`` event at all
(``ML_RUNNING_AFTER_MS``), so a jump from 2 to 4 alone is no gap. It ends right after a
terminal state.

**Streamed output** (``params.stream`` on a generation; ``docs/streaming.md``). Each delta the
ML worker publishes is ``event: output`` with data ``{"delta", "offset"}`` (``offset``: characters
of text before the delta) and ``id: 3.<end>``, where ``end`` is ``offset + len(delta)``: the
running rank, a dot, and how much text the client has once it has this event. Ids therefore sort
(rank first, then end) after ``running`` (``3``) and before the terminal status (``4``); a
``running`` or ``dispatched`` event that arrives after output has started is not sent (output
implies running). ``Last-Event-ID: 3.<n>`` resumes after the first ``n`` characters. A stream that
starts or resumes mid-generation (or reloads its state) first gets the text it lacks in ONE
output event, read from the text so far kept in Redis, then the live deltas: it subscribes before
reading, a delta is APPENDed and published atomically, and deltas are trimmed or dropped by
offset, so there is no gap and no duplicate; a delta whose offset lies beyond what was sent (a
lost message) makes the stream read the text so far again.

Per client this costs the handler's own task, one in-process :class:`Subscription` and a timer:
no extra task and no Redis connection; a resume costs one more Redis read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from bridges.clients.notifications import NotificationHub, Subscription
from inferstream.errors import InferstreamError
from schemas.documents import event_id
from schemas.records import STATUS_RANK, TERMINAL
from streams import queue_eta
from streams.gateway.metrics import SSE_CLIENTS

log = logging.getLogger(__name__)

LoadDoc = Callable[[], Awaitable[dict[str, Any] | None]]
LoadHistory = Callable[[], Awaitable[list[dict[str, Any]]]]
KEEP_ALIVE = b": keep-alive\n\n"
SNAPSHOT = "snapshot"  # the data's "replayed" value on an event that stands for missed ones
TERMINAL_RANK = max(STATUS_RANK.values())
OUTPUT_RANK = STATUS_RANK["running"]  # output events sort after running, before the terminal status
_TIMED_OUT: Any = object()
LoadOutput = Callable[[], Awaitable[str]]


def parse_last_event_id(value: str | None) -> int | None:
    """The client's ``Last-Event-ID`` as a rank, 0 when absent, None when no state has that id."""
    if value is None or not value.strip():
        return 0
    try:
        rank = int(value.strip())
    except ValueError:
        return None
    return rank if 0 <= rank <= TERMINAL_RANK else None


def parse_cursor(value: str | None) -> tuple[int, int] | None:
    """``Last-Event-ID`` as (rank, characters of output seen); None when no event has that id."""
    if value is not None and "." in value:
        rank_part, _, end_part = value.strip().partition(".")
        try:
            rank, end = int(rank_part), int(end_part)
        except ValueError:
            return None
        return (rank, end) if rank == OUTPUT_RANK and end >= 0 else None
    plain = parse_last_event_id(value)
    return None if plain is None else (plain, 0)


def streams_output(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` is a generation under way that may stream its output.

    Status documents published by the sink carry no ``params``: without them any generation
    may stream, and costs its stream one read of the (usually absent) text so far.
    """
    if doc.get("task") != "generate" or doc.get("status") in TERMINAL:
        return False
    params = doc.get("params")
    return not isinstance(params, dict) or params.get("stream") is True


def format_output(delta: str, offset: int) -> bytes:
    return b"id: %d.%d\nevent: output\ndata: %s\n\n" % (
        OUTPUT_RANK,
        offset + len(delta),
        orjson.dumps({"delta": delta, "offset": offset}),
    )


def format_event(doc: dict[str, Any]) -> bytes:
    status = doc["status"]
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        event_id(status),
        status.encode(),
        orjson.dumps(doc),
    )


def _rank(doc: dict[str, Any]) -> int | None:
    rank = STATUS_RANK.get(doc.get("status", ""))
    if rank is None:
        log.warning("ignoring a document with unknown status %r", doc.get("status"))
    return rank


class _Emitter:
    """Writes a state only if it is newer than everything already sent; remembers when it last wrote."""

    __slots__ = ("resp", "last_id", "out_end", "written_at")

    def __init__(self, resp: web.StreamResponse, last_id: int, out_end: int = 0) -> None:
        self.resp = resp
        self.last_id = last_id
        self.out_end = out_end  # characters of streamed output the client has
        self.written_at = asyncio.get_running_loop().time()

    async def send_output(self, delta: str, offset: int) -> bool:
        """Send the part of a delta the client lacks; False when it starts beyond (a gap)."""
        if self.last_id >= TERMINAL_RANK:
            return True
        end = offset + len(delta)
        if end <= self.out_end:
            return True  # already sent (in the text so far, or a repeat)
        if offset > self.out_end:
            return False
        if offset < self.out_end:
            delta, offset = delta[self.out_end - offset :], self.out_end
        await self._write(format_output(delta, offset))
        self.out_end = end
        self.last_id = max(self.last_id, OUTPUT_RANK)
        return True

    async def sync_output(self, load_output: LoadOutput, request_id: str) -> None:
        """Send, in one event, the text so far that the client lacks."""
        try:
            text = await load_output()
        except InferstreamError as exc:
            log.warning("sse %s: no text so far: %s", request_id, exc)
            return
        if len(text) > self.out_end:
            await self.send_output(text[self.out_end :], self.out_end)

    async def send(self, doc: dict[str, Any], *, snapshot: bool = False) -> bool:
        """Send ``doc`` if it is news; True when the stream is over (the state is terminal)."""
        rank = _rank(doc)
        if rank is None:
            return False
        if rank > self.last_id:
            # A waiting request's event says where it is in its queue (streams/queue_eta.py).
            await self._write(format_event(queue_eta.annotate({**doc, "replayed": SNAPSHOT} if snapshot else doc)))
            self.last_id = rank
        return doc["status"] in TERMINAL

    async def catch_up(
        self,
        doc: dict[str, Any],
        load_history: LoadHistory,
        request_id: str,
        *,
        force: bool = False,
    ) -> bool:
        """Send what happened after ``last_id`` up to ``doc``: replayed from the history, or one
        snapshot of ``doc`` when the history cannot serve it (``force``: the client's id is
        unknown, so nothing it claims to have seen counts). True when the stream is over."""
        rank = _rank(doc)
        if rank is None:
            return False
        if not force and (self.last_id == 0 or rank <= self.last_id + 1):
            return await self.send(doc)  # a new stream starts at the current state; or no gap
        history: list[dict[str, Any]] = []
        if not force:
            try:
                history = await load_history()
            except InferstreamError as exc:
                log.warning("sse %s: no history to replay: %s", request_id, exc)
        # It serves only if it has reached the state the client is about to get.
        if history and (_rank(history[-1]) or 0) >= rank:
            for item in history:
                if await self.send(item):
                    return True
            return await self.send(doc)
        if force:
            self.last_id = 0
        return await self.send(doc, snapshot=True)

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
    cursor = parse_cursor(request.headers.get("Last-Event-ID"))
    last_id = None if cursor is None else cursor[0]

    async def load_history() -> list[dict[str, Any]]:
        return await hub.history(request_id)

    async def load_output() -> str:
        return await hub.output(request_id)

    # Subscribe before reading the state: anything published after the read is then queued.
    sub = hub.subscribe(request_id)
    SSE_CLIENTS.inc()
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
            emitter = _Emitter(resp, last_id or 0, 0 if cursor is None else cursor[1])
            if doc is None or not await emitter.catch_up(
                doc, load_history, request_id, force=last_id is None
            ):
                output = _Output(load_output) if doc is not None and streams_output(doc) else None
                if output is not None:
                    await emitter.sync_output(output.load, request_id)
                await _pump(request, emitter, sub, load_doc, load_history, hub, heartbeat_s, poll_s, output)
        except ConnectionResetError:
            pass  # the client went away: nothing to report, the subscription is dropped below
    finally:
        SSE_CLIENTS.dec()
        hub.unsubscribe(sub)
    return resp


class _Output:
    """A streaming request's text-so-far reader (None in ``_pump`` for every other request)."""

    __slots__ = ("load",)

    def __init__(self, load: LoadOutput) -> None:
        self.load = load


async def _pump(
    request: web.Request,
    emitter: _Emitter,
    sub: Subscription,
    load_doc: LoadDoc,
    load_history: LoadHistory,
    hub: NotificationHub,
    heartbeat_s: float,
    poll_s: float,
    output: _Output | None = None,
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
        if item is not _TIMED_OUT and item is not None:
            delta = item.get("output")
            if delta is not None:
                if output is not None and not await emitter.send_output(delta["delta"], delta["offset"]):
                    await emitter.sync_output(output.load, sub.request_id)  # a delta was lost: catch up
                continue
            if await emitter.send(item):
                return
        now = loop.time()
        # None from the hub: it (re)connected or lost Redis, or we fell behind: reload the state
        # and replay what was missed. Live items need no history: every change is published.
        if item is None or (not hub.healthy and now >= next_poll):
            next_poll = now + poll_s
            doc = await _reload(load_doc, sub.request_id)
            if doc is not None and await emitter.catch_up(doc, load_history, sub.request_id):
                return
            if output is not None:
                await emitter.sync_output(output.load, sub.request_id)
        if now >= emitter.written_at + heartbeat_s:
            await emitter.keep_alive()
