"""The ML worker: consumes the work queues, runs each request against the model, publishes its result.

Per message: decode (undecodable -> rejected to the dead-letter exchange);
expired or already cancelled (the request, or the batch of a Batch API line:
``is_cancelled`` is asked about both ids at once) -> that terminal status, no
model call; else a
best-effort ``running`` event (only when the work outlasts
``ml_running_after_ms``), then attempts with backoff until an answer, a
fatal error, or the end of the retry budget (``workers/retry.py``); a failed
request's ``error`` carries why it stopped and every attempt's failure. The
message is acked only after the terminal event (and, for ``failed``, the dead
letter) is confirmed published; a worker that dies before that leaves it
unacked, so RabbitMQ redelivers it. Events that finish in the same loop tick
share one results message and one confirm (``workers/results.py``); the acks
of a tick share frames, ``multiple=True`` up to the channel's low watermark
of finished deliveries (``workers/acks.py``).

Each route (task + public model) has its queue, consumer and endpoint
(``workers/endpoint.py``: its backends, limits and batcher). While every
backend of a route has its breaker open, its queue is not consumed; messages
already held wait for a breaker instead of bouncing through the broker. A
routes reload (``inferstream/route_watch.py``) adds consumers for new routes
and gives a changed route a new endpoint for new messages; messages in hand
finish on the endpoint they started on, which closes when its last one ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from mode import Service

from bridges.clients.rabbitmq import AMQP_ERRORS, Consumer, PublishError, RabbitClient
from inferstream import clock, logs, tracing
from inferstream.retrying import TERMINAL_PUBLISH, failure, next_sleep
from inferstream.route_watch import RouteKey, RouteWatcher
from inferstream.routes import Route, RouteTable
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from workers.acks import Acks
from workers.breaker import BreakerState
from workers.endpoint import Endpoint
from workers.fairshare import FAIR_SHARE, FairGate, GateClosed, gate_slots
from workers.gather import GatheredLookup
from workers.job import Job
from workers.results import ResultPublisher

__all__ = ["IsCancelled", "MLWorker", "no_cancellations"]

log = logging.getLogger(__name__)

IsCancelled = Callable[[Sequence[str]], Awaitable[set[str]]]
"""Those of the given ids that were cancelled: request ids and batch ids (``batch_...``) together,
in one round trip (``RedisClient.cancelled``)."""
CANCEL_POLL_S = 0.5
SUPERVISE_S = 0.2


async def no_cancellations(request_ids: Sequence[str]) -> set[str]:
    """The default ``is_cancelled``: nothing is ever cancelled."""
    return set()


def _cancel_ids(req: InferenceRequest) -> list[str]:
    """The ids whose cancel mark stops ``req``: its own, and its batch's for a Batch API line."""
    return [req.request_id, req.batch_id] if req.batch_id else [req.request_id]


class MLWorker(Service):
    """Consumes the work queue of every route ``routes`` serves; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        rabbit: RabbitClient,
        routes: RouteWatcher | None = None,
        is_cancelled: IsCancelled = no_cancellations,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rabbit = rabbit
        self.routes = routes if routes is not None else (rabbit.route_watcher or RouteWatcher(settings))
        self.results = ResultPublisher(rabbit)
        self.is_cancelled: IsCancelled = GatheredLookup(is_cancelled)
        self.running_after_s = settings.ml_running_after_ms / 1000
        self.endpoints: dict[RouteKey, Endpoint] = {}
        self.gates: dict[Endpoint, FairGate] = {}  # fair share between users (workers/fairshare.py)
        self._consumers: dict[RouteKey, Consumer] = {}
        self._superseded: set[Endpoint] = set()  # replaced by a reload; closed when their last job ends
        self._routes_lock = asyncio.Lock()
        self._consumers_missing = False  # a reload's new queues still want their consumers
        self._jobs: set[Job] = set()
        self._stopping = False
        self._consuming_set_up = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle -----------------------------------------------------
    async def on_start(self) -> None:
        await self.rabbit.connect()
        await self._serve_routes(self.routes.table)
        self.routes.subscribe(self._serve_routes)
        self._consuming_set_up = True
        log.info("ML worker consuming %d queues", len(self._consumers))

    async def _serve_routes(self, table: RouteTable) -> None:
        """Endpoints and consumers for every served route (at start, and after each reload)."""
        async with self._routes_lock:
            served = self.routes.served()
            for route in served:
                self._endpoint_for(route)
            self._close_idle_superseded()
            try:
                await self.rabbit.declare_routes([r.key for r in served])
                for route in served:
                    if route.key not in self._consumers:
                        self._consumers[route.key] = await self.rabbit.consumer(
                            self.rabbit.work_queue_name(*route.key),
                            functools.partial(self._on_message, route.key, Acks()),
                            prefetch=self.settings.ml_prefetch,
                            start=not self._stopping,
                        )
                self._consumers_missing = False
            except AMQP_ERRORS as exc:
                if not self._consuming_set_up:
                    raise  # at start: the worker is not ready, and says why
                # After a reload with RabbitMQ away: the supervisor tries again until it is back.
                self._consumers_missing = True
                log.warning("consumers for reloaded routes not set up yet (RabbitMQ: %r); retrying", exc)
        self._wake.set()

    def _endpoint_for(self, route: Route) -> Endpoint:
        endpoint = self.endpoints.get(route.key)
        if endpoint is not None and endpoint.route == route:
            return endpoint
        if endpoint is not None:
            self._superseded.add(endpoint)
        endpoint = self.endpoints[route.key] = Endpoint(
            self.settings, route, on_breaker_change=self._breaker_changed
        )
        if FAIR_SHARE:
            self.gates[endpoint] = FairGate(gate_slots(route))
        return endpoint

    def _close_idle_superseded(self) -> None:
        busy = {j.endpoint for j in self._jobs}
        for endpoint in [e for e in self._superseded if e not in busy]:
            self._superseded.discard(endpoint)
            self.gates.pop(endpoint, None)
            self.add_future(endpoint.close())

    async def on_stop(self) -> None:
        """Stop taking messages, let in-flight work finish for the grace period, requeue the rest."""
        self._stopping = True
        for gate in self.gates.values():
            gate.close()  # messages not started yet go back to RabbitMQ now, not after the grace
        await self._reconcile()
        grace = self.settings.ml_shutdown_grace_s
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            pass
        if self._jobs:
            log.warning("shutdown grace of %.1fs over: requeueing %d messages", grace, len(self._jobs))
            handlers = [j.handler for j in self._jobs if j.handler is not None]
            for handler in handlers:
                handler.cancel()
            await asyncio.wait(handlers, timeout=5.0)
        for consumer in self._consumers.values():
            try:
                await consumer.close()
            except AMQP_ERRORS as exc:
                log.warning("closing consumer channel failed: %r", exc)
        await self.results.close()
        for endpoint in [*self.endpoints.values(), *self._superseded]:
            await endpoint.close()

    def health(self) -> dict[str, Any]:
        """Breaker states, in-flight counts and whether the queues are consumed (``/readyz`` detail)."""
        endpoints = {}
        for key, endpoint in self.endpoints.items():
            consumer = self._consumers.get(key)
            endpoints[endpoint.name] = {
                "task": endpoint.task,
                "model": endpoint.route.model,
                "retired": key in self.routes.retired,
                "breaker": endpoint.pool.state,
                "backends": endpoint.pool.health(),
                "in_flight": sum(1 for j in self._jobs if j.endpoint.route.key == key),
                "consuming": consumer is not None and consumer.consuming,
                "queue": None if consumer is None else consumer.queue.name,
            }
        return {
            # Every queue has its consumer and the worker is not shutting down (breakers aside).
            "ready": self._consuming_set_up and not self._stopping and self.rabbit.connected,
            "consuming": bool(endpoints) and all(e["consuming"] for e in endpoints.values()),
            "in_flight": len(self._jobs),
            "stopping": self._stopping,
            "endpoints": endpoints,
        }

    # ---- consumption control ------------------------------------------
    def _breaker_changed(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self._wake.set()

    def _want_consuming(self, endpoint: Endpoint) -> bool:
        if self._stopping:
            return False
        pool = endpoint.pool
        if not pool.probing:  # some backend is closed
            return True
        # Only probes can go out: take messages again, with nothing in hand, so one of them can probe.
        busy = any(j.endpoint is endpoint for j in self._jobs)
        return pool.accepting and not busy

    async def _reconcile(self) -> None:
        for key, consumer in list(self._consumers.items()):
            endpoint = self.endpoints[key]
            want = self._want_consuming(endpoint)
            try:
                if want and not consumer.consuming:
                    await consumer.resume()
                    log.info("resumed consuming %s", consumer.queue.name)
                elif not want and consumer.consuming:
                    await consumer.pause()
                    log.info("stopped consuming %s (breakers %s)", consumer.queue.name, endpoint.pool.state)
            except AMQP_ERRORS as exc:
                log.warning("could not change consumption of %s: %r", consumer.queue.name, exc)

    @Service.task
    async def _supervise(self) -> None:
        while not self.should_stop and not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), SUPERVISE_S)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self._stopping:
                if self._consumers_missing and self.rabbit.connected:
                    await self._serve_routes(self.routes.table)
                await self._reconcile()

    @Service.task
    async def _poll_cancellations(self) -> None:
        while not self.should_stop:
            await self.sleep(CANCEL_POLL_S)
            running = [j for j in self._jobs if j.work is not None and not j.work.done() and not j.cancel_requested]
            if not running:
                continue
            cancelled = await self._cancelled_ids([i for j in running for i in _cancel_ids(j.req)])
            for job in running:
                if not cancelled.isdisjoint(_cancel_ids(job.req)) and job.work is not None:
                    job.cancel_requested = True
                    job.work.cancel()

    async def _cancelled_ids(self, ids: Sequence[str]) -> set[str]:
        try:
            return set(await self.is_cancelled(ids))
        except Exception:  # an injected lookup (Redis) that fails must not stop the worker
            log.exception("cancellation lookup failed; treating %d requests as not cancelled", len(ids))
            return set()

    # ---- one message ---------------------------------------------------
    async def _on_message(self, key: RouteKey, acks: Acks, message: AbstractIncomingMessage) -> None:
        # Before any await, so no earlier delivery is missing when a later one is acked.
        acks.delivered(message)
        endpoint = self.endpoints[key]  # the route's endpoint now: a reload may have replaced it
        if self._stopping:
            await acks.settle_now(message, requeue=True)
            return
        try:
            req = InferenceRequest.from_bytes(message.body)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("undecodable work message %s rejected to dead letters: %r", message.message_id, exc)
            await acks.settle_now(message, reject=True)
            return
        logs.set_request_id(req.request_id)  # each delivery is its own task
        job = Job(req, message, endpoint, handler=asyncio.current_task())
        self._jobs.add(job)
        self._idle.clear()
        endpoint.in_flight.inc()
        gate = self.gates.get(endpoint)
        try:
            if gate is not None and not gate.try_enter():
                await gate.enter(req.user_id, str(req.priority))
            try:
                if tracing.ENABLED:
                    await self._handle_traced(job)
                else:
                    await self._handle(job)
            finally:
                if gate is not None:
                    gate.leave()
            job.acking = True
            await acks.ack(message)
        except GateClosed:
            await acks.settle_now(message, requeue=True)  # shutdown before it started: another worker takes it
        except asyncio.CancelledError:
            # Only shutdown cancels a handler: give the message back so it is redelivered
            # (unless its ack is already on its way: the result is confirmed).
            if not job.acking:
                await acks.settle_now(message, requeue=True)
            raise
        finally:
            self._jobs.discard(job)
            if not self._jobs:
                self._idle.set()
            endpoint.in_flight.dec()
            if endpoint in self._superseded:
                self._close_idle_superseded()
            self._wake.set()

    async def _handle_traced(self, job: Job) -> None:
        """``_handle`` inside an ``ml work`` span, under the forward span the work message names."""
        req = job.req
        job.parent = tracing.header_context(job.message.headers)
        span = tracing.start(
            "ml work", job.parent, kind=tracing.SpanKind.CONSUMER,
            attributes={
                "inferstream.request_id": req.request_id, "inferstream.route": job.endpoint.name,
                "gen_ai.request.model": req.model, "messaging.system": "rabbitmq",
                "messaging.destination.name": self.rabbit.work_queue_name(req.task, req.model),
                "inferstream.priority": str(req.priority),
            },
        )  # fmt: skip
        with tracing.use(span):
            await self._handle(job)

    async def _handle(self, job: Job) -> None:
        req, now = job.req, clock.now()
        dead = False
        if req.deadline_at is not None and now >= req.deadline_at:
            event = ResultEvent.for_request(req, "expired", at=now)
        elif await self._cancelled_ids(_cancel_ids(req)):
            event = ResultEvent.for_request(req, "cancelled", at=now)
        else:
            job.started_at = clock.now()
            if req.dispatched_at is not None:
                self._waited(job, req.dispatched_at, job.started_at)
            loop = asyncio.get_running_loop()
            job.work = loop.create_task(job.run(job.endpoint.retry))
            # `running` is reported once the work has taken longer than the delay: a fast
            # call (a batched embedding) goes straight to its terminal event, saving a
            # publish, a log write, a row update and a notification per request. A timer,
            # not asyncio.wait: no waiter, callbacks and set per message.
            running: list[asyncio.Task[None]] = []

            def report_running() -> None:
                running.append(loop.create_task(self._publish_running(req, job.started_at)))

            timer: asyncio.TimerHandle | None = None
            if self.running_after_s <= 0:
                await self._publish_running(req, job.started_at)
            else:
                timer = loop.call_later(self.running_after_s, report_running)
            try:
                event, dead = await job.work
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not job.cancel_requested or (current is not None and current.cancelling()):
                    for task in running:
                        task.cancel()
                    raise
                batch = f" (batch {req.batch_id})" if req.batch_id else ""
                log.info("request %s cancelled while running%s", req.request_id, batch)
                event = job.event("cancelled")
            finally:
                if timer is not None:
                    timer.cancel()
            if running:  # confirmed (or given up) before the terminal event goes out
                await running[0]
        await self._publish_terminal(job, event, dead)
        job.endpoint.terminal(event.status).inc()

    @staticmethod
    def _waited(job: Job, dispatched_at: float, started_at: float) -> None:
        job.endpoint.waited(job.req.priority, started_at - dispatched_at)
        if tracing.ENABLED:
            # A span after the fact: from the hand-off to RabbitMQ to now, beside the ml work span.
            wait = tracing.start(
                "queue wait", job.parent, start_time=dispatched_at,
                attributes={"inferstream.request_id": job.req.request_id, "inferstream.priority": str(job.req.priority)},
            )  # fmt: skip
            wait.end(int(started_at * 1e9))

    # ---- publishing and acks ------------------------------------------
    async def _publish_running(self, req: InferenceRequest, started_at: float | None) -> None:
        try:
            at = clock.now() if started_at is None else started_at
            trace = tracing.traceparent(tracing.current_span()) if tracing.ENABLED else None
            await self.results.publish(ResultEvent.for_request(req, "running", at=at), trace)
        except PublishError as exc:
            log.warning("running event of %s not published (carrying on): %r", req.request_id, exc)

    async def _publish_terminal(self, job: Job, event: ResultEvent, dead: bool) -> None:
        """Publish until confirmed: the message is not acked before, so a crash here redelivers it."""
        if not tracing.ENABLED:
            await self._publish_terminal_once(job, event, dead, None)
            return
        span = tracing.start(
            "publish result", kind=tracing.SpanKind.PRODUCER,
            attributes={
                "inferstream.request_id": event.request_id, "inferstream.status": str(event.status),
                "messaging.system": "rabbitmq", "messaging.destination.name": self.rabbit.results_queue_name,
            },
        )  # fmt: skip
        with tracing.use(span):
            await self._publish_terminal_once(job, event, dead, tracing.traceparent(span))

    async def _publish_terminal_once(self, job: Job, event: ResultEvent, dead: bool, trace: str | None) -> None:
        dead_sent = not dead

        async def publish() -> None:
            nonlocal dead_sent
            if not dead_sent:
                # The attempt history travels in its own header, not twice.
                error = {k: v for k, v in (event.error or {}).items() if k != "history"}
                await self.rabbit.publish_dead_letter(job.req, job.history, error)
                dead_sent = True
            await self.results.publish(event, trace)

        # The first try without tenacity's machinery (it almost always succeeds); a failure
        # enters the loop as its first attempt, so the backoff and the logs are the loop's.
        try:
            await publish()
            return
        except PublishError as exc:
            first: PublishError | None = exc
        async for attempt in TERMINAL_PUBLISH.retrying(
            PublishError,
            before_sleep=lambda state: log.warning(
                "terminal event of %s not confirmed, retrying in %.2fs: %r",
                event.request_id, next_sleep(state), failure(state),
            ),  # fmt: skip
        ):
            with attempt:
                if first is not None:
                    failed, first = first, None
                    raise failed
                await publish()
