"""Admission: a submission in, a queued request out (or a refusal), decided on the owner of the user's quota.

The view (``streams/gateway/requests.py``) only maps HTTP in and out; this
service does the work, in this order:

1. authenticate the key (``tables/keys.py``), and tell whether this worker owns
   the user's quota partition (else the view forwards the request there);
2. validate the body (``schemas/api.py``) and the callback host (may resolve it);
3. with no ``await`` in between: the Idempotency-Key lookup, the deadline
   check against the route's queue ETA (:mod:`streams.queue_eta`; refused
   before anything is charged), the quota check-and-reserve, the idempotent
   answer remembered;
4. await the changelog acks of those writes, then write the request to the log
   and await its ack: after a crash every request in the log is charged;
5. on a timeout or a log error, roll back (reservation released, idempotency
   entry forgotten) and refuse with ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from aiokafka.errors import KafkaError
from prometheus_client import Histogram
from yarl import URL

from bridges.clients.redis import CacheUnavailable, OwnedDoc, RedisClient
from inferstream import clock, logs, tracing
from inferstream.coalesce import Coalesced
from inferstream.errors import (
    DeadlineUnreachable,
    InvalidRequest,
    PublicError,
    QuotaExceeded,
    Unavailable,
)
from inferstream.ids import new_request_id
from inferstream.route_watch import RouteWatcher
from inferstream.settings import Priority, Settings
from inferstream.tokens import estimate_tokens
from schemas.api import Submission, check_callback_url, parse_submission
from schemas.documents import Accepted, Links, request_doc
from schemas.plans import Plan
from schemas.records import InferenceRequest
from streams import queue_eta
from streams.gateway import metrics
from streams.gateway.routing import OwnerRouter
from streams.topics import Topics
from tables.idempotency import IdempotencyBook, fingerprint
from tables.keys import KeyCache, Principal
from tables.quota_book import QuotaBook

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
ADMISSION_SECONDS = Histogram(
    "inferstream_admission_seconds",
    "Admission decided: from the body read to the 202 or the refusal, by outcome (as inferstream_admissions_total).",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


@dataclass(frozen=True)
class Admitted:
    """The answer to render: 202 with ``body`` and ``headers``, or an earlier answer replayed as it was."""

    status: int
    body: Any
    headers: dict[str, str]
    replayed: bool = False


class Refused(QuotaExceeded):
    """A quota refusal with the user's current limits (the ``X-RateLimit-*`` figures) attached."""

    def __init__(self, exc: QuotaExceeded, limits: dict[str, str]) -> None:
        super().__init__(exc.type, exc.message, retry_after=exc.retry_after or 1, **exc.details)
        self.limits = limits


class AdmissionService:
    """The single entry of new work; see the module docstring for the order of its steps."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: KeyCache,
        router: OwnerRouter,
        quota: QuotaBook,
        idempotency: IdempotencyBook,
        topics: Topics,
        redis: RedisClient,
        routes: RouteWatcher,
        now: Callable[[], float] = clock.now,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.router = router
        self.quota = quota
        self.idempotency = idempotency
        self.topics = topics
        self.redis = redis
        self.now = now
        self.routes = routes
        # One Redis round trip for all the admissions of a tick.
        self._cache_new: Coalesced[OwnedDoc, None] = Coalesced(redis.cache_docs)
        self._timers: dict[str, Any] = {}
        self._admitted = metrics.ADMISSIONS.labels("admitted")  # a label lookup costs more than inc()
        self.eta = queue_eta.SHARED
        self.eta.attach(settings, redis=redis)

    async def authenticate(self, key: str | None) -> Principal:
        return await self.keys.authenticate(key)

    def owner_of(self, user_id: str) -> URL | None:
        """The owning worker's URL, or None when this worker owns ``user_id``'s partition."""
        return self.router.owner(user_id)

    async def admit(self, principal: Principal, body: bytes, idempotency_key: str | None) -> Admitted:
        """Decide one submission (timed by outcome; inside an ``admission`` span when tracing is on)."""
        started = time.perf_counter()
        outcome = "error"
        try:
            if tracing.ENABLED:
                with tracing.use(tracing.start("admission", attributes={"enduser.id": principal.user_id})):
                    admitted = await self._admit(principal, body, idempotency_key)
            else:
                admitted = await self._admit(principal, body, idempotency_key)
            outcome = "replayed" if admitted.replayed else "admitted"
            return admitted
        except PublicError as exc:
            outcome = exc.type
            raise
        finally:
            self._timer(outcome).observe(time.perf_counter() - started)

    def _timer(self, outcome: str) -> Any:
        # Label lookups hash and lock: once per outcome, not per request.
        child = self._timers.get(outcome)
        if child is None:
            child = self._timers[outcome] = ADMISSION_SECONDS.labels(outcome)
        return child

    async def _admit(self, principal: Principal, body: bytes, idempotency_key: str | None) -> Admitted:
        self.routes.table  # noqa: B018 - loads the routes on first use
        sub = parse_submission(body, self.routes.model_routes)
        if sub.callback_url is not None:
            await check_callback_url(sub.callback_url, self.settings)  # may resolve its host: before admission
        body_fp = ""
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
                raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
            body_fp = fingerprint(body)
        estimated = estimate_tokens(sub.task, sub.input, sub.max_tokens, self.settings.default_max_tokens)
        return await self._reserve_and_enqueue(principal, sub, estimated, idempotency_key, body_fp)

    def _priority(self, plan: Plan, sub: Submission) -> Priority:
        """The priority asked for, capped by the plan and then by the route (neither rejects it)."""
        priority = plan.cap_priority(sub.priority)
        route = self.routes.route(sub.task, sub.model)
        return priority if route is None else cast(Priority, route.cap_priority(priority))

    def _check_deadline(self, sub: Submission, priority: Priority) -> None:
        """Refuse a strict deadline the queue cannot meet; no estimate yet (route never polled) admits."""
        assert sub.deadline_s is not None
        est = self.eta.estimate(sub.task, sub.model, priority)
        if est is None or est.eta_s is None or est.eta_s <= sub.deadline_s:
            return
        metrics.ADMISSIONS.labels(DeadlineUnreachable.type).inc()
        eta = round(est.eta_s, 3)
        raise DeadlineUnreachable(
            f"the queue for {sub.task}/{sub.model} starts new {priority} requests in about {eta} s,"
            f" after deadline_s={sub.deadline_s}; retry later or submit with deadline_policy 'best_effort'",
            eta_s=eta, deadline_s=sub.deadline_s, retry_after=queue_eta.retry_after(est.eta_s, sub.deadline_s),
            queue=est.doc(),
        )  # fmt: skip

    async def _reserve_and_enqueue(
        self, principal: Principal, sub: Submission, estimated: int, idem_key: str | None, body_fp: str
    ) -> Admitted:
        user, plan = principal.user_id, principal.plan
        # ---- from here to the first await: check and write, atomically -------------
        if idem_key is not None:
            prior = self.idempotency.lookup(user, idem_key, body_fp)
            if prior is not None:
                metrics.ADMISSIONS.labels("replayed").inc()
                return Admitted(prior["status"], prior["body"], dict(prior["headers"]), replayed=True)
        priority = self._priority(plan, sub)
        if sub.deadline_s is not None and sub.deadline_policy == "strict":
            self._check_deadline(sub, priority)
        now = self.now()
        request_id = new_request_id(now)
        logs.set_request_id(request_id)
        try:
            admission = self.quota.admit(user, plan, request_id, estimated, at=now)
        except QuotaExceeded as exc:
            metrics.ADMISSIONS.labels(exc.type).inc()
            raise Refused(exc, self.quota.snapshot(user, plan).headers()) from None
        req = InferenceRequest(
            request_id=request_id,
            user_id=user,
            task=sub.task,
            model=sub.model,
            input=sub.input,
            input_is_list=sub.input_is_list,
            estimated_tokens=estimated,
            created_at=now,
            quota_day=admission.window_day,
            priority=priority,
            params=sub.params,
            deadline_at=now + sub.deadline_s if sub.deadline_s else None,
            metadata=sub.metadata,
            callback_url=sub.callback_url,
            webhook_events=sub.webhook_events,
        )
        if tracing.ENABLED:
            tracing.current_span().set_attribute("inferstream.request_id", request_id)
        self_url = f"/v1/requests/{request_id}"
        answer = Accepted(
            request_id=request_id,
            status="queued",
            estimated_tokens=estimated,
            created_at=clock.iso(now) or "",
            links=Links(self_=self_url, events=f"{self_url}/events"),
        )
        headers = {**admission.headers(), "Location": self_url}
        charged = [self.quota.written(user)]
        if idem_key is not None:
            replay = {"status": 202, "headers": headers, "body": msgspec.to_builtins(answer)}
            self.idempotency.remember(user, idem_key, body_fp, replay)
            charged.append(self.idempotency.written(user))
        # ---- awaits from here on ------------------------------------------------
        try:
            # wait_for, not asyncio.timeout: on Python 3.11 with uvloop the pure-Python Timeout
            # costs more than wait_for's task (micro-benchmark: ~7 against ~5 us per call).
            await asyncio.wait_for(
                self._charge_then_enqueue(req, charged), self.settings.admission_timeout_s
            )
        except (TimeoutError, KafkaError) as exc:
            # Not in the log, so never processed: give the allowance back.
            log.warning("request %s not written to the log, released: %r", request_id, exc)
            self.quota.release(user, request_id, now, estimated)
            if idem_key is not None:
                self.idempotency.forget(user, idem_key)
            metrics.ADMISSIONS.labels("unavailable").inc()
            raise Unavailable("the request log is unavailable", retry_after=2) from exc
        self.quota.logged(request_id)
        self._admitted.inc()
        return Admitted(202, answer, headers)

    async def _charge_then_enqueue(self, req: InferenceRequest, charged: list[Awaitable[Any]]) -> None:
        """The broker holds the charge before the request: after a crash every request in the log is charged.

        Faust writes a table's changelog in the background; a 202 sent before it is
        acknowledged can be lost in a kill -9 and the allowance granted again.
        """
        if not tracing.ENABLED:
            await _all(charged)
            await self._write_request(req)
            return
        attributes = {"inferstream.request_id": req.request_id}
        with tracing.use(tracing.start("changelog write", attributes=attributes)):
            await _all(charged)
        span = tracing.start(
            f"{self.settings.requests_topic} publish", kind=tracing.SpanKind.PRODUCER,
            attributes={**attributes, "messaging.system": "kafka", "messaging.destination.name": self.settings.requests_topic},
        )  # fmt: skip
        with tracing.use(span):
            await self._write_request(req, tracing.kafka_headers(span))

    async def _write_request(self, req: InferenceRequest, headers: dict[str, bytes] | None = None) -> None:
        """Append to the requests topic and wait for the broker's ack; cache the queued doc meanwhile."""
        pending = await self.topics.requests.send(key=req.user_id, value=req, headers=headers)
        cache = asyncio.ensure_future(self._cache_queued(req))
        try:
            await asyncio.shield(pending)  # a timeout upstream must not cancel Faust's own future
        finally:
            await cache

    async def _cache_queued(self, req: InferenceRequest) -> None:
        # Read-your-writes for GET right after the 202 (the cache never goes back to an earlier status).
        row = {**req.asdict(), "status": "queued", "updated_at": req.created_at}
        try:
            await self._cache_new((req.user_id, request_doc(row)))
        except CacheUnavailable as exc:
            log.debug("queued doc of %s not cached: %r", req.request_id, exc)


async def _all(acks: list[Awaitable[Any]]) -> None:
    """Await every ack; the usual single one without ``gather``'s future and callbacks."""
    if len(acks) == 1:
        await acks[0]
    else:
        await asyncio.gather(*acks)
