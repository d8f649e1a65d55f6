"""Redis: the result cache and the cancellation registry (the notification hub behind SSE is ``notifications.py``).

Keys and channels all start with ``{namespace}:``:

- ``{ns}:req:{request_id}``    hash ``r`` (status rank) and ``v`` (``{"user_id", "doc"}`` JSON), TTL
  ``result_ttl_s``; a write never replaces a document of a later status. Fields ``e1``..``e3``
  keep the first step (:func:`schemas.documents.step_of`: status, time, attempts) of each
  earlier rank (queued, dispatched, running): with ``v`` they rebuild the event history an SSE
  resume replays, for a few dozen bytes per state; it goes with the rest of the entry.
- ``{ns}:cancel:{request_id}`` set for 24 h once a request is cancelled.
- ``{ns}:cancel-batch:{batch_id}`` set for 24 h (a batch's completion window) once a Batch API
  batch is cancelled: the ML workers start none of its lines any more and stop those running.
- ``{ns}:events:{request_id}`` pub/sub channel carrying the document JSON on every status change,
  and a streamed generation's deltas as ``{"request_id", "output": {"delta", "offset"}}``
  (``workers/streaming.py``; offsets count characters of the text so far).
- ``{ns}:out:{request_id}``    string, the text a streamed generation produced so far (APPENDed with
  each delta in the same transaction as its publish), TTL ``result_ttl_s``: what a stream that
  resumes mid-generation sends first.

Every :class:`RedisClient` method raises :class:`CacheUnavailable` (and nothing else from the
driver) when Redis cannot be reached; socket timeouts are short so a dead Redis costs about half
a second, and the caller decides whether that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson
from mode import Service
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from inferstream.errors import InferstreamError
from inferstream.ids import is_batch_id
from inferstream.settings import Settings
from schemas.documents import doc_at, step_of
from schemas.records import STATUS_RANK

log = logging.getLogger(__name__)

OwnedDoc = tuple[str, Mapping[str, Any]]
"""``(user_id, doc)``: a request document with its owner, who is not part of the document."""

CANCEL_TTL_S = 86_400
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

TERMINAL_RANK = max(STATUS_RANK.values())
_ARGS_PER_DOC = 5
_HISTORY_FIELDS = [f"e{rank}" for rank in range(1, TERMINAL_RANK)]
# A whole batch of docs in ONE script call: per doc, ARGV carries rank, value, step, channel and
# message (after ARGV[1..3]: TTL, cache?, publish?), KEYS its cache key. Caching keeps the entry
# monotonic when events arrive out of order or two sinks race, and records the first document of
# every non-terminal rank, even a late one (the terminal one is ``v``); each doc is published
# after it is cached, whether or not it was newer (a listener drops what it already has).
# One call instead of two commands per doc: redis-py reads each reply of a pipeline under its own
# asyncio timeout, and that per-reply work was most of what a sink batch cost here in Redis calls.
_WRITE = f"""
local ttl, cache, publish = ARGV[1], ARGV[2] == '1', ARGV[3] == '1'
for i, key in ipairs(KEYS) do
  local at = 3 + (i - 1) * {_ARGS_PER_DOC}
  if cache then
    local rank = tonumber(ARGV[at + 1])
    if rank >= 1 and rank < {TERMINAL_RANK} then redis.call('HSETNX', key, 'e' .. ARGV[at + 1], ARGV[at + 3]) end
    local cur = redis.call('HGET', key, 'r')
    if not (cur and tonumber(cur) > rank) then
      redis.call('HSET', key, 'r', ARGV[at + 1], 'v', ARGV[at + 2])
      redis.call('EXPIRE', key, ttl)
    end
  end
  if publish then redis.call('PUBLISH', ARGV[at + 4], ARGV[at + 5]) end
end
return #KEYS
"""
_APPEND_OUTPUT = """
redis.call('APPEND', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('PUBLISH', ARGV[3], ARGV[4])
"""
_WRITE_CHUNK = 200  # docs per script call: a call holds Redis for its whole length (tens of us per doc at most)


class CacheUnavailable(InferstreamError):
    """Redis could not be reached or did not answer in time."""


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    try:
        yield
    except REDIS_DOWN as exc:
        raise CacheUnavailable(f"redis {what}: {exc}") from exc


def connect_redis(settings: Settings, *, op_timeout_s: float | None, connect_timeout_s: float) -> Redis:
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
                    self._redis = connect_redis(
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
            with contextlib.suppress(*REDIS_DOWN):
                await redis.aclose()

    # ---- names -------------------------------------------------------------
    def doc_key(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def cancel_key(self, request_id: str) -> str:
        return f"{self.prefix}cancel:{request_id}"

    def batch_cancel_key(self, batch_id: str) -> str:
        return f"{self.prefix}cancel-batch:{batch_id}"

    def channel(self, request_id: str) -> str:
        return f"{self.prefix}events:{request_id}"

    def output_key(self, request_id: str) -> str:
        return f"{self.prefix}out:{request_id}"

    # ---- streamed output ---------------------------------------------------
    async def publish_output(self, request_id: str, delta: str, offset: int) -> None:
        """Append ``delta`` to the text so far and publish it, atomically (one script): a reader
        that subscribed before reading the text sees every delta either in it or after it."""
        redis = await self._client()
        message = orjson.dumps({"request_id": request_id, "output": {"delta": delta, "offset": offset}})
        key = self.output_key(request_id)
        with _guard("publish_output"):
            # One script call is as atomic as MULTI/APPEND/EXPIRE/PUBLISH/EXEC and has one reply, not five.
            await redis.eval(
                _APPEND_OUTPUT, 1, key, delta.encode(), self.settings.result_ttl_s,
                self.channel(request_id), message,
            )  # fmt: skip

    async def output_so_far(self, request_id: str) -> str:
        """The text a streamed generation has produced so far ("" when none, or no longer kept)."""
        redis = await self._client()
        with _guard("output_so_far"):
            raw = await redis.get(self.output_key(request_id))
        if raw is None:
            return ""
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

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
        head: list[Any] = [self.settings.result_ttl_s, 1 if cache else 0, 1 if publish else 0]
        calls = []
        for start in range(0, len(docs), _WRITE_CHUNK):
            keys: list[str] = []
            args = list(head)
            for user_id, doc in docs[start : start + _WRITE_CHUNK]:
                request_id = doc["request_id"]
                message = orjson.dumps(doc)
                keys.append(self.doc_key(request_id))
                if cache:
                    rank = STATUS_RANK.get(doc["status"], 0)
                    step = orjson.dumps(step_of(doc)) if rank < TERMINAL_RANK else b""
                    # {"user_id", "doc"} around the doc's JSON, without encoding the doc again.
                    value = b'{"user_id":%s,"doc":%s}' % (orjson.dumps(user_id), message)
                    args += (rank, value, step)
                else:
                    args += (0, b"", b"")
                args += (self.channel(request_id), message if publish else b"")
            calls.append((keys, args))
        with _guard("write"):
            if len(calls) == 1:
                keys, args = calls[0]
                # EVAL, not EVALSHA: redis-py's Script would add a SCRIPT EXISTS round trip; the
                # script is sent once per batch, not per doc.
                await redis.eval(_WRITE, len(keys), *keys, *args)
                return
            async with redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.eval(_WRITE, len(keys), *keys, *args)
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

    async def mark_batch_cancelled(self, batch_id: str) -> None:
        """Mark a batch cancelled: ML workers answer its lines ``cancelled`` instead of starting them."""
        redis = await self._client()
        with _guard("mark_batch_cancelled"):
            await redis.set(self.batch_cancel_key(batch_id), b"1", ex=CANCEL_TTL_S)

    async def cancelled(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that were cancelled, in one round trip (one ``MGET``).

        ``ids`` may mix request ids and batch ids (``batch_...``, :func:`inferstream.ids.is_batch_id`):
        the ML worker asks about a Batch API line and its batch together.
        """
        if not ids:
            return set()
        keys = [self.batch_cancel_key(i) if is_batch_id(i) else self.cancel_key(i) for i in ids]
        redis = await self._client()
        with _guard("cancelled"):
            flags = await redis.mget(keys)
        return {i for i, flag in zip(ids, flags, strict=True) if flag is not None}

    async def batch_cancelled(self, batch_ids: Sequence[str]) -> set[str]:
        """The subset of ``batch_ids`` marked cancelled, in one round trip."""
        if not batch_ids:
            return set()
        redis = await self._client()
        with _guard("batch_cancelled"):
            flags = await redis.mget([self.batch_cancel_key(i) for i in batch_ids])
        return {i for i, flag in zip(batch_ids, flags, strict=True) if flag is not None}
