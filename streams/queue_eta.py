"""Queue position and ETA per route and priority, from live throughput: counters in Redis, depths from RabbitMQ.

Each route has one RabbitMQ work queue with message priorities, so a request is
behind every waiting request of a higher priority and every earlier one of its
own. What is known, cheaply and without touching a request on the hot path:

- ``dispatched[p]``: how many requests of priority ``p`` the forward agents
  handed to the route's queue (each worker counts its batches in memory and
  adds them to a Redis hash once per poll);
- ``ready``: the queue's ready messages (a passive declare, once per poll);
- so ``delivered = sum(dispatched) - ready``: what the ML workers took.

Each poll gives the newly delivered messages to the highest priorities first,
as RabbitMQ does, which yields per-priority pending counts and, with a short
history of ``dispatched``, a request's place from its ``created_at``. The
delivery rate while the queue is backlogged is the route's capacity. Messages
already prefetched by ML workers but not started are ahead of everything
ready: ``consumers * (prefetch - concurrency)`` while the queue is backlogged.

ETA = ``BASE_S + ahead / rate``, None while the rate is still unknown. Polling
costs one Redis pipeline and one passive declare per route per ``POLL_S``,
whatever the request rate; ``estimate`` is arithmetic on memory.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiormq
from redis.exceptions import RedisError

from inferstream import clock

if TYPE_CHECKING:
    from bridges.clients.rabbitmq import RabbitClient
    from bridges.clients.redis import RedisClient
    from inferstream.settings import Settings
    from schemas.records import InferenceRequest

log = logging.getLogger(__name__)

ENABLED = True  # off: no counting in forward, no polling, no ``queue`` in documents, no deadline refusals
POLL_S = 0.25
BASE_S = 0.05  # forward batching and the hop to a worker: the wait of a request with nothing ahead
RATE_WINDOW_S = 5.0
HISTORY_S = 600.0
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")  # highest first: RabbitMQ delivers in this order
_NAME = {p: p for p in PRIORITIES}  # enum members hash as their strings: this yields the plain string
WAITING = frozenset({"queued", "dispatched"})
Route = tuple[str, str]
# Redis or RabbitMQ away for a while (aiormq raises RuntimeError on a closed channel): the next poll retries.
_DOWN: tuple[type[Exception], ...] = (RedisError, OSError, aiormq.exceptions.AMQPError, RuntimeError)


@dataclass(frozen=True)
class Estimate:
    """Where a request stands: ``ahead`` requests start before it; ``eta_s`` is None while the rate is unknown."""

    ahead: int
    eta_s: float | None

    def doc(self) -> dict[str, Any]:
        eta = None if self.eta_s is None else round(self.eta_s, 3)
        return {"position": self.ahead + 1, "ahead": self.ahead, "eta_s": eta}


@dataclass
class RouteState:
    """One route's queue as last polled; ``observe`` is pure arithmetic so that it can be tested alone."""

    buffer_per_consumer: int = 0
    dispatched: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    consumed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIORITIES, 0))
    delivered: int = 0  # high-water mark: a redelivery or a count not yet flushed must not count twice
    ready: int = 0
    consumers: int = 0
    rate: float | None = None
    times: list[float] = field(default_factory=list)  # poll times and ``dispatched`` then, oldest first
    counts: list[dict[str, int]] = field(default_factory=list)
    backlog: deque[tuple[float, int]] = field(default_factory=deque)  # (at, delivered) while backlogged
    started: bool = False

    def observe(self, at: float, dispatched: Mapping[str, int], ready: int, consumers: int) -> None:
        self.dispatched = {p: int(dispatched.get(p, 0)) for p in PRIORITIES}
        delivered = max(0, sum(self.dispatched.values()) - ready)
        if not self.started:
            # First look: assume what was delivered went highest priority first.
            self.started, self.delivered = True, delivered
            left = delivered
            for p in PRIORITIES:
                self.consumed[p] = min(self.dispatched[p], left)
                left -= self.consumed[p]
        elif delivered > self.delivered:
            left = delivered - self.delivered
            self.delivered = delivered
            for p in PRIORITIES:
                take = min(left, max(0, self.dispatched[p] - self.consumed[p]))
                self.consumed[p] += take
                left -= take
        self.ready, self.consumers = ready, consumers
        self._rate(at, ready > 0)
        self.times.append(at)
        self.counts.append(dict(self.dispatched))
        if len(self.times) > 2 * HISTORY_S / POLL_S:  # trimmed in halves: amortised O(1) per poll
            keep = bisect.bisect_left(self.times, at - HISTORY_S)
            del self.times[:keep], self.counts[:keep]

    def _rate(self, at: float, backlogged: bool) -> None:
        if not backlogged:
            self.backlog.clear()  # an idle queue says nothing about capacity: keep the last rate
            return
        self.backlog.append((at, self.delivered))
        while len(self.backlog) > 2 and self.backlog[0][0] < at - RATE_WINDOW_S:
            self.backlog.popleft()
        first_at, first = self.backlog[0]
        if at - first_at >= 4 * POLL_S and self.delivered > first:
            self.rate = (self.delivered - first) / (at - first_at)

    def pending(self, priority: str) -> int:
        return max(0, self.dispatched[priority] - self.consumed[priority])

    def ticket(self, priority: str, created_at: float | None) -> int | None:
        """How many of ``priority`` were dispatched up to ``created_at`` (None: not dispatched yet, it goes last)."""
        at = None if created_at is None else created_at + BASE_S
        if at is None or not self.times or at >= self.times[-1]:
            return None
        i = bisect.bisect_left(self.times, at)
        if i == 0:
            return self.counts[0][priority]
        t0, t1, d0, d1 = self.times[i - 1], self.times[i], self.counts[i - 1], self.counts[i]
        share = (at - t0) / (t1 - t0) if t1 > t0 else 1.0
        return int(d0[priority] + share * (d1[priority] - d0[priority]))

    def estimate(self, priority: str, created_at: float | None = None) -> Estimate:
        if priority not in self.dispatched:
            priority = "normal"
        level = PRIORITIES.index(priority)
        higher = sum(self.pending(p) for p in PRIORITIES[:level])
        ticket = self.ticket(priority, created_at)
        own = self.pending(priority) if ticket is None else max(0, ticket - self.consumed[priority])
        prefetched = self.consumers * self.buffer_per_consumer if self.ready > 0 else 0
        ahead = higher + own + prefetched
        if ahead == 0:
            return Estimate(0, BASE_S)
        return Estimate(ahead, None if not self.rate else BASE_S + ahead / self.rate)


def configure(settings: Settings) -> None:
    """``INFERSTREAM_QUEUE_ETA``: decided once, when the pipeline is built (off costs nothing per request)."""
    global ENABLED
    ENABLED = settings.queue_eta.strip().lower() != "off"


class QueueEta:
    """The estimator of one worker process: counts its forward batches and polls every route it has seen."""

    def __init__(self) -> None:
        self.routes: dict[Route, RouteState] = {}
        self._unflushed: Counter[tuple[Route, str]] = Counter()
        self._redis: RedisClient | None = None
        self._rabbit: RabbitClient | None = None
        self._settings: Settings | None = None
        self._task: asyncio.Task[None] | None = None

    def attach(
        self, settings: Settings, *, redis: RedisClient | None = None, rabbit: RabbitClient | None = None
    ) -> None:
        """Hand over the clients (admission brings Redis, the forward agent RabbitMQ)."""
        self._settings = settings
        self._redis = redis or self._redis
        self._rabbit = rabbit or self._rabbit

    # ---- the hot path: memory only --------------------------------------------
    def dispatched(self, batch: Sequence[InferenceRequest]) -> None:
        """Count a forward batch handed to RabbitMQ (flushed to Redis by the next poll)."""
        if not ENABLED:
            return
        for r in batch:
            self._unflushed[((r.task, r.model), _NAME.get(r.priority, "normal"))] += 1
        self._ensure_polling()

    def estimate(self, task: str, model: str, priority: str, created_at: float | None = None) -> Estimate | None:
        """None when the route was never polled (admission then decides as if there were no queue)."""
        if not ENABLED:
            return None
        state = self.routes.get((task, model))
        if state is None:
            self.routes[(task, model)] = self._state()
            self._ensure_polling()
            return None
        return state.estimate(priority, created_at) if state.started else None

    def annotate(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` itself, or a copy with ``queue: {position, ahead, eta_s}`` when it is still waiting.

        A copy because a notification's doc may be shared by every stream of the request.
        """
        if not ENABLED or doc.get("status") not in WAITING:
            return doc
        est = self.estimate(doc.get("task", ""), doc.get("model", ""), doc.get("priority", "normal"), _epoch(doc))
        return doc if est is None else {**doc, "queue": est.doc()}

    # ---- polling ----------------------------------------------------------------
    def _state(self) -> RouteState:
        s = self._settings
        buffer = 0 if s is None else max(0, s.ml_prefetch - s.ml_concurrency)
        return RouteState(buffer_per_consumer=buffer)

    def _ensure_polling(self) -> None:
        if self._task is None or self._task.done():
            with contextlib.suppress(RuntimeError):  # no running loop: the next call from one starts it
                self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except _DOWN as exc:
                log.debug("queue ETA poll failed: %r", exc)
            await asyncio.sleep(POLL_S)

    async def poll(self) -> None:
        if self._redis is None or self._rabbit is None or self._settings is None:
            return
        redis = await self._redis._client()  # noqa: SLF001 - a hash of counters, no RedisClient method fits
        flush, self._unflushed = self._unflushed, Counter()
        for route, _priority in flush:
            self.routes.setdefault(route, self._state())
        routes = list(self.routes)
        try:
            pipe = redis.pipeline(transaction=False)
            for (route, priority), n in flush.items():
                pipe.hincrby(self._key(route), priority, n)
            for route in routes:
                pipe.hgetall(self._key(route))
            answers = await pipe.execute()
        except RedisError:
            self._unflushed.update(flush)  # counted next time
            raise
        counts = answers[len(flush):]
        for route, raw in zip(routes, counts, strict=True):
            ready, consumers = await self._depth(route)
            dispatched = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}
            self.routes[route].observe(clock.now(), dispatched, ready, consumers)

    def _key(self, route: Route) -> str:
        ns = self._settings.namespace if self._settings is not None else "inferstream"
        return f"{ns}:eta:{route[0]}:{route[1]}"

    async def _depth(self, route: Route) -> tuple[int, int]:
        assert self._rabbit is not None
        connection = await self._rabbit._connection_ready()  # noqa: SLF001 - message_count() drops consumer_count
        async with connection.channel() as channel:
            queue = await channel.declare_queue(self._rabbit.work_queue_name(*route), passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)


def _epoch(doc: Mapping[str, Any]) -> float | None:
    created = doc.get("created_at")
    if not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def retry_after(eta_s: float, deadline_s: float) -> int:
    """Seconds until the queue has drained enough for ``deadline_s`` (at least 1)."""
    return max(1, math.ceil(eta_s - deadline_s))


SHARED = QueueEta()
annotate = SHARED.annotate
