"""Redis: the result cache, the cancellation registry and the notification hub behind SSE.

Keys and channels all start with ``{namespace}:``:

- ``{ns}:req:{request_id}``    hash ``r`` (status rank) and ``v`` (``{"user_id", "doc"}`` JSON), TTL
  ``result_ttl_s``; a write never replaces a document of a later status. Fields ``e1``..``e3``
  keep the first step (:func:`schemas.documents.step_of`: status, time, attempts) of each
  earlier rank (queued, dispatched, running): with ``v`` they rebuild the event history an SSE
  resume replays, for a few dozen bytes per state; it goes with the rest of the entry.
- ``{ns}:cancel:{request_id}`` set for 24 h once a request is cancelled.
- ``{ns}:events:{request_id}`` pub/sub channel carrying the document JSON on every status change.

Every :class:`RedisClient` method raises :class:`CacheUnavailable` (and nothing else from the
driver) when Redis cannot be reached; socket timeouts are short so a dead Redis costs about half
a second, and the caller decides whether that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import orjson
from mode import Service
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferstream.errors import InferstreamError
from inferstream.retrying import REDIS_SUBSCRIBE, any_error
from inferstream.settings import Settings
from schemas.documents import doc_at, step_of
from schemas.records import STATUS_RANK

log = logging.getLogger(__name__)

OwnedDoc = tuple[str, Mapping[str, Any]]
"""``(user_id, doc)``: a request document with its owner, who is not part of the document."""

CANCEL_TTL_S = 86_400
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

TERMINAL_RANK = max(STATUS_RANK.values())
_HISTORY_FIELDS = [f"e{rank}" for rank in range(1, TERMINAL_RANK)]
# Keeps the cache monotonic when events arrive out of order or two sinks race; records the
# first document of every non-terminal rank, even a late one (the terminal one is ``v``).
_SET_IF_NOT_OLDER = f"""
local rank = tonumber(ARGV[1])
if rank >= 1 and rank < {TERMINAL_RANK} then redis.call('HSETNX', KEYS[1], 'e' .. ARGV[1], ARGV[4]) end
local cur = redis.call('HGET', KEYS[1], 'r')
if cur and tonumber(cur) > rank then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'v', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class CacheUnavailable(InferstreamError):
    """Redis could not be reached or did not answer in time."""


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except _DOWN as exc:
        raise CacheUnavailable(f"redis {what}: {exc}") from exc


def _connect(settings: Settings, *, op_timeout_s: float | None, connect_timeout_s: float) -> Redis:
    # No driver retries: a retry loop inside redis-py would turn half a second into several.
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class RedisClient(Service):
    """Cache, notifications and cancellations over one lazily created connection pool; closed on stop."""

    def __init__(
        self, settings: Settings, *, op_timeout_s: float = 0.5, connect_timeout_s: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.prefix = f"{settings.namespace}:"
        self._op_timeout_s = op_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._redis: Redis | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------
    async def _client(self) -> Redis:
        if self._redis is None:
            async with self._lock:
                if self._redis is None:
                    self._redis = _connect(
                        self.settings,
                        op_timeout_s=self._op_timeout_s,
                        connect_timeout_s=self._connect_timeout_s,
                    )
        return self._redis

    async def on_stop(self) -> None:
        await self.close()

    async def ping(self) -> None:
        redis = await self._client()
        with _guard("ping"):
            await redis.ping()

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        if redis is not None:
            with contextlib.suppress(*_DOWN):
                await redis.aclose()

    # ---- names -------------------------------------------------------------
    def doc_key(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def cancel_key(self, request_id: str) -> str:
        return f"{self.prefix}cancel:{request_id}"

    def channel(self, request_id: str) -> str:
        return f"{self.prefix}events:{request_id}"

    # ---- result cache ------------------------------------------------------
    async def cache_docs(self, docs: Sequence[OwnedDoc]) -> None:
        """Cache ``(user_id, doc)`` pairs in one round trip; an older status never overwrites a newer one."""
        await self._write(docs, cache=True, publish=False)

    async def publish_docs(self, docs: Sequence[OwnedDoc]) -> None:
        """Publish each doc on its request's channel, in one round trip."""
        await self._write(docs, cache=False, publish=True)

    async def cache_and_publish(self, docs: Sequence[OwnedDoc]) -> None:
        """Both, in one round trip; each doc is cached before it is published so a reader never misses it."""
        await self._write(docs, cache=True, publish=True)

    async def _write(self, docs: Sequence[OwnedDoc], *, cache: bool, publish: bool) -> None:
        if not docs:
            return
        redis = await self._client()
        ttl = self.settings.result_ttl_s
        with _guard("write"):
            async with redis.pipeline(transaction=False) as pipe:
                for user_id, doc in docs:
                    request_id = doc["request_id"]
                    if cache:
                        value = orjson.dumps({"user_id": user_id, "doc": doc})
                        rank = STATUS_RANK.get(doc["status"], 0)
                        # EVAL, not EVALSHA: redis-py would add a SCRIPT EXISTS round trip per pipeline.
                        step = orjson.dumps(step_of(doc)) if rank < TERMINAL_RANK else b""
                        pipe.eval(
                            _SET_IF_NOT_OLDER, 1, self.doc_key(request_id), rank, value, ttl, step
                        )
                    if publish:
                        pipe.publish(self.channel(request_id), orjson.dumps(doc))
                await pipe.execute()

    async def get_doc(self, request_id: str) -> tuple[str, dict[str, Any]] | None:
        """``(user_id, doc)`` from the cache, or None when it is not (or no longer) cached."""
        redis = await self._client()
        with _guard("get"):
            raw = await redis.hget(self.doc_key(request_id), "v")
        if raw is None:
            return None
        entry = orjson.loads(raw)
        return entry["user_id"], entry["doc"]

    async def history(self, request_id: str) -> list[dict[str, Any]]:
        """The documents of every status recorded for a request, in rank order, ending with the
        current one; empty when nothing is cached (expired, evicted, or never written here)."""
        redis = await self._client()
        with _guard("history"):
            *steps, current = await redis.hmget(self.doc_key(request_id), [*_HISTORY_FIELDS, "v"])
        if current is None:
            return []
        doc: dict[str, Any] = orjson.loads(current)["doc"]
        rank = STATUS_RANK.get(doc["status"], 0)
        earlier = [
            doc_at(doc, orjson.loads(step))
            for r, step in enumerate(steps, start=1)
            if step is not None and r < rank
        ]
        return [*earlier, doc]

    # ---- cancellations -----------------------------------------------------
    async def mark_cancelled(self, request_id: str) -> None:
        redis = await self._client()
        with _guard("mark_cancelled"):
            await redis.set(self.cancel_key(request_id), b"1", ex=CANCEL_TTL_S)

    async def cancelled(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that were cancelled, in one round trip."""
        if not ids:
            return set()
        redis = await self._client()
        with _guard("cancelled"):
            flags = await redis.mget([self.cancel_key(i) for i in ids])
        return {i for i, flag in zip(ids, flags, strict=True) if flag is not None}


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
        redis = _connect(
            self.settings, op_timeout_s=self._connect_timeout_s, connect_timeout_s=self._connect_timeout_s
        )
        pubsub = redis.pubsub()
        try:
            await pubsub.psubscribe(f"{self.prefix}*")
            await self._listen(pubsub)
        except Exception as exc:
            if not isinstance(exc, _DOWN):
                # Keep the one subscription alive whatever happened; the traceback says what.
                log.exception("notification hub failed; reconnecting")
            elif self._healthy:
                log.warning("notification hub lost redis (%s); listeners fall back to polling", exc)
            if not self._healthy:
                raise
        finally:
            self._set_healthy(False)
            with contextlib.suppress(*_DOWN):
                await pubsub.aclose()
            with contextlib.suppress(*_DOWN):
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
