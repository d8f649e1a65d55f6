"""The notification hub behind SSE: one Redis pub/sub connection per process, fanned out to listeners.

Status documents are published on ``{ns}:events:{request_id}`` by the last stage
(``streams/delivery.py``, through :meth:`RedisClient.cache_and_publish`); every
worker's hub subscribes to ``{ns}:events:*`` once and hands each document to the
in-process :class:`Subscription` of its request, so an SSE client connected to
any worker hears events produced on any other. A streamed generation's deltas travel on the
same channel (``{"request_id", "output": {...}}``, published by the ML worker through
:meth:`RedisClient.publish_output`), so a listener needs no second subscription; :meth:`output`
reads the text so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from mode import Service
from redis.asyncio.client import PubSub
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridges.clients.redis import REDIS_DOWN, RedisClient, connect_redis
from inferstream.retrying import REDIS_SUBSCRIBE, any_error
from inferstream.settings import Settings

log = logging.getLogger(__name__)


class Subscription:
    """Docs published for one request, as seen by one listener in this process.

    ``get()`` returns a document, or None meaning "you may have missed something: reload
    the current state" (the hub reconnected or lost Redis, or this listener fell behind and
    its bounded queue overflowed).
    """

    __slots__ = ("request_id", "_queue")

    def __init__(self, request_id: str, maxsize: int) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize)

    def offer(self, item: dict[str, Any] | None) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # A slow listener loses the backlog, not memory: it reloads the state instead.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)

    async def get(self) -> dict[str, Any] | None:
        return await self._queue.get()

    def qsize(self) -> int:
        return self._queue.qsize()

    def __aiter__(self) -> AsyncIterator[dict[str, Any] | None]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any] | None]:
        while True:
            yield await self._queue.get()


class NotificationHub(Service):
    """One Redis pub/sub connection per process (``PSUBSCRIBE {ns}:events:*``), fanned out in-process.

    ``healthy`` is True while the subscription is live. On every connect and disconnect all
    subscriptions receive None, so listeners reload the state (or switch to polling).
    :meth:`history` reads what a listener missed, through ``cache`` (or a client of its own).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        cache: RedisClient | None = None,
        queue_size: int = 16,
        ping_interval_s: float = 2.0,
        backoff_max_s: float = REDIS_SUBSCRIBE.cap_s,
        connect_timeout_s: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.prefix = f"{settings.namespace}:events:"
        self._queue_size = queue_size
        self._ping_interval_s = ping_interval_s
        self._reconnect = REDIS_SUBSCRIBE.tuned(REDIS_SUBSCRIBE.base_s, backoff_max_s)
        self._connect_timeout_s = connect_timeout_s
        self._subs: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._healthy = False
        self._healthy_event = asyncio.Event()
        self._own_cache = cache is None
        self.cache = cache if cache is not None else RedisClient(settings)

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def listeners(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def on_start(self) -> None:
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="notification-hub"
            )

    async def on_stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_healthy(False)
        if self._own_cache:
            await self.cache.close()

    async def history(self, request_id: str) -> list[dict[str, Any]]:
        """See :meth:`RedisClient.history`; raises :class:`CacheUnavailable`."""
        return await self.cache.history(request_id)

    async def output(self, request_id: str) -> str:
        """See :meth:`RedisClient.output_so_far`; raises :class:`CacheUnavailable`."""
        return await self.cache.output_so_far(request_id)

    async def wait_healthy(self, timeout_s: float) -> bool:
        """Wait until the subscription is live (for startup and tests); False on timeout."""
        self._ensure_started()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._healthy_event.wait()
        return self._healthy

    def subscribe(self, request_id: str) -> Subscription:
        self._ensure_started()
        sub = Subscription(request_id, self._queue_size)
        self._subs.setdefault(request_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.request_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.request_id]

    def _set_healthy(self, healthy: bool) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            self._healthy_event.set()
        else:
            self._healthy_event.clear()
        for subs in self._subs.values():
            for sub in subs:
                sub.offer(None)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        request_id = channel.decode()[len(self.prefix) :]
        subs = self._subs.get(request_id)
        if not subs:
            return
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed notification on %s", channel)
            return
        for sub in subs:
            sub.offer(doc)

    async def _run(self) -> None:
        while True:
            # A fresh policy per live subscription: after losing one, the first reconnect is
            # immediate and the backoff starts again from its shortest wait.
            async for attempt in self._reconnect.retrying(any_error):
                with attempt:
                    await self._subscription()

    async def _subscription(self) -> None:
        """One connection's subscription; raises if it ended before it went live, returns if after."""
        redis = connect_redis(
            self.settings, op_timeout_s=self._connect_timeout_s, connect_timeout_s=self._connect_timeout_s
        )
        pubsub = redis.pubsub()
        try:
            await pubsub.psubscribe(f"{self.prefix}*")
            await self._listen(pubsub)
        except Exception as exc:
            if not isinstance(exc, REDIS_DOWN):
                # Keep the one subscription alive whatever happened; the traceback says what.
                log.exception("notification hub failed; reconnecting")
            elif self._healthy:
                log.warning("notification hub lost redis (%s); listeners fall back to polling", exc)
            if not self._healthy:
                raise
        finally:
            self._set_healthy(False)
            with contextlib.suppress(*REDIS_DOWN):
                await pubsub.aclose()
            with contextlib.suppress(*REDIS_DOWN):
                await redis.aclose()

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        pinged = False
        while True:
            msg = await pubsub.get_message(timeout=self._ping_interval_s / 2)
            now = loop.time()
            if msg is None:
                if now - last_seen > 3 * self._ping_interval_s:
                    raise RedisTimeoutError("no answer to pub/sub pings")
                if now - last_seen > self._ping_interval_s and not pinged:
                    # A silent peer (no RST) is only noticed if we ask.
                    await pubsub.ping()
                    pinged = True
                continue
            last_seen, pinged = now, False
            kind = msg["type"]
            if kind == "psubscribe":
                self._set_healthy(True)
            elif kind == "pmessage":
                self._dispatch(msg["channel"], msg["data"])
