"""The ML worker: consumes the work queues, runs each request against the model, publishes its result.

Per message: decode (undecodable -> rejected to the dead-letter exchange);
expired or already cancelled -> that terminal status, no model call; else a
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

While an endpoint's breaker is open its queues are not consumed; messages
already held wait for the breaker instead of bouncing through the broker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from mode import Service

from bridges.clients.model import ModelClient
from bridges.clients.rabbitmq import AMQP_ERRORS, Consumer, PublishError, RabbitClient
from inferstream import clock
from inferstream.retrying import TERMINAL_PUBLISH, failure, next_sleep
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from workers.acks import Acks
from workers.breaker import BreakerState
from workers.endpoint import Endpoint
from workers.gather import GatheredLookup
from workers.job import Job
from workers.results import ResultPublisher
from workers.retry import RetryPolicy

__all__ = ["IsCancelled", "MLWorker", "no_cancellations"]

log = logging.getLogger(__name__)

IsCancelled = Callable[[Sequence[str]], Awaitable[set[str]]]
CANCEL_POLL_S = 0.5
SUPERVISE_S = 0.2


async def no_cancellations(request_ids: Sequence[str]) -> set[str]:
    """The default ``is_cancelled``: nothing is ever cancelled."""
    return set()


class MLWorker(Service):
    """Consumes every work queue of ``settings.models``; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        rabbit: RabbitClient,
        model: ModelClient,
        is_cancelled: IsCancelled = no_cancellations,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.rabbit = rabbit
        self.model = model
        self.results = ResultPublisher(rabbit)
        self.is_cancelled: IsCancelled = GatheredLookup(is_cancelled)
        self.retry = RetryPolicy.from_settings(settings)
        self.running_after_s = settings.ml_running_after_ms / 1000
        self.endpoints: dict[str, Endpoint] = {}
        self._consumers: dict[str, list[Consumer]] = {}
        self._jobs: set[Job] = set()
        self._stopping = False
        self._consuming_set_up = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle -----------------------------------------------------
    async def on_start(self) -> None:
        await self.rabbit.connect()
        for task, model in self.rabbit.routes():
            endpoint = self.endpoints.get(task)
            if endpoint is None:
                endpoint = self.endpoints[task] = Endpoint(
                    self.settings, self.model, task, on_breaker_change=self._breaker_changed
                )
            consumer = await self.rabbit.consumer(
                self.rabbit.work_queue_name(task, model),
                functools.partial(self._on_message, endpoint, Acks()),
                prefetch=self.settings.ml_prefetch,
            )
            self._consumers.setdefault(task, []).append(consumer)
        self._consuming_set_up = True
        log.info("ML worker consuming %d queues", sum(len(c) for c in self._consumers.values()))

    async def on_stop(self) -> None:
        """Stop taking messages, let in-flight work finish for the grace period, requeue the rest."""
        self._stopping = True
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
        for consumers in self._consumers.values():
            for consumer in consumers:
                try:
                    await consumer.close()
                except AMQP_ERRORS as exc:
                    log.warning("closing consumer channel failed: %r", exc)
        await self.results.close()
        for endpoint in self.endpoints.values():
            await endpoint.close()

    def health(self) -> dict[str, Any]:
        """Breaker states, in-flight counts and whether the queues are consumed (``/readyz`` detail)."""
        endpoints = {}
        for task, endpoint in self.endpoints.items():
            consumers = self._consumers.get(task, [])
            endpoints[endpoint.name] = {
                "task": task,
                "breaker": endpoint.breaker.state,
                "consecutive_failures": endpoint.breaker.consecutive_failures,
                "in_flight": sum(1 for j in self._jobs if j.endpoint is endpoint),
                "consuming": bool(consumers) and all(c.consuming for c in consumers),
                "queues": [c.queue.name for c in consumers],
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
        state = endpoint.breaker.state
        # Half-open with nothing in hand: take messages again so one of them can probe.
        busy = any(j.endpoint is endpoint for j in self._jobs)
        return state == "closed" or (state == "half_open" and not busy)

    async def _reconcile(self) -> None:
        for task, endpoint in self.endpoints.items():
            want = self._want_consuming(endpoint)
            for consumer in self._consumers.get(task, []):
                try:
                    if want and not consumer.consuming:
                        await consumer.resume()
                        log.info("resumed consuming %s", consumer.queue.name)
                    elif not want and consumer.consuming:
                        await consumer.pause()
                        log.info("stopped consuming %s (breaker %s)", consumer.queue.name, endpoint.breaker.state)
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
                await self._reconcile()

    @Service.task
    async def _poll_cancellations(self) -> None:
        while not self.should_stop:
            await self.sleep(CANCEL_POLL_S)
            running = [j for j in self._jobs if j.work is not None and not j.work.done() and not j.cancel_requested]
            if not running:
                continue
            cancelled = await self._cancelled_ids([j.req.request_id for j in running])
            for job in running:
                if job.req.request_id in cancelled and job.work is not None:
                    job.cancel_requested = True
                    job.work.cancel()

    async def _cancelled_ids(self, ids: Sequence[str]) -> set[str]:
        try:
            return set(await self.is_cancelled(ids))
        except Exception:  # an injected lookup (Redis) that fails must not stop the worker
            log.exception("cancellation lookup failed; treating %d requests as not cancelled", len(ids))
            return set()

    # ---- one message ---------------------------------------------------
    async def _on_message(self, endpoint: Endpoint, acks: Acks, message: AbstractIncomingMessage) -> None:
        # Before any await, so no earlier delivery is missing when a later one is acked.
        acks.delivered(message)
        if self._stopping:
            await acks.settle_now(message, requeue=True)
            return
        try:
            req = InferenceRequest.from_bytes(message.body)
        except (ValueError, TypeError, KeyError) as exc:
            log.error("undecodable work message %s rejected to dead letters: %r", message.message_id, exc)
            await acks.settle_now(message, reject=True)
            return
        job = Job(req, message, endpoint, handler=asyncio.current_task())
        self._jobs.add(job)
        self._idle.clear()
        endpoint.in_flight.inc()
        try:
            await self._handle(job)
            job.acking = True
            await acks.ack(message)
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
            self._wake.set()

    async def _handle(self, job: Job) -> None:
        req, now = job.req, clock.now()
        dead = False
        if req.deadline_at is not None and now >= req.deadline_at:
            event = ResultEvent.for_request(req, "expired", at=now)
        elif req.request_id in await self._cancelled_ids([req.request_id]):
            event = ResultEvent.for_request(req, "cancelled", at=now)
        else:
            job.started_at = clock.now()
            loop = asyncio.get_running_loop()
            job.work = loop.create_task(job.run(self.retry))
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
                log.info("request %s cancelled while running", req.request_id)
                event = job.event("cancelled")
            finally:
                if timer is not None:
                    timer.cancel()
            if running:  # confirmed (or given up) before the terminal event goes out
                await running[0]
        await self._publish_terminal(job, event, dead)
        job.endpoint.terminal(event.status).inc()

    # ---- publishing and acks ------------------------------------------
    async def _publish_running(self, req: InferenceRequest, started_at: float | None) -> None:
        try:
            at = clock.now() if started_at is None else started_at
            await self.results.publish(ResultEvent.for_request(req, "running", at=at))
        except PublishError as exc:
            log.warning("running event of %s not published (carrying on): %r", req.request_id, exc)

    async def _publish_terminal(self, job: Job, event: ResultEvent, dead: bool) -> None:
        """Publish until confirmed: the message is not acked before, so a crash here redelivers it."""
        dead_sent = not dead

        async def publish() -> None:
            nonlocal dead_sent
            if not dead_sent:
                # The attempt history travels in its own header, not twice.
                error = {k: v for k, v in (event.error or {}).items() if k != "history"}
                await self.rabbit.publish_dead_letter(job.req, job.history, error)
                dead_sent = True
            await self.results.publish(event)

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
