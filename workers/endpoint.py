"""One route's call path (task + public model): its backends, rate limit, concurrency limit and batcher.

Every model call goes through :meth:`Endpoint.call`, in this order: a
concurrency slot, a backend (``workers/backends.py``: by weight and fallback
order among those whose breaker lets a call through; waits while every one is
open), a rate-limit token, the request's deadline, the call. The limits are the
route's (the routes file, or the ``INFERSTREAM_ML_*`` settings). Taking the
slot first means callers queued behind breakers that just opened do not rush a
dead model when it is half-open.
The deadline is checked last because a prefetched message can wait there for
many seconds behind a backlog: it must not reach the model once it expired.
An open breaker is a pause, not a failure, but a bounded one: the wait ends at
the request's deadline (:class:`DeadlinePassed`) or at the end of its retry
budget (:class:`RetryBudgetSpent`), whichever comes first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Histogram

from bridges.clients.model import OnDelta
from inferstream import clock
from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.retrying import model_call
from inferstream.routes import Route
from inferstream.settings import Settings
from workers import metrics
from workers.backends import BackendPool, BreakerChange, Upstream
from workers.batching import Batcher, Served, Usage
from workers.ratelimit import TokenBucket
from workers.retry import RetryBudget, RetryPolicy

QUEUE_WAIT = Histogram(
    "inferstream_queue_wait_seconds",
    "From the hand-off to RabbitMQ (dispatched_at) to the start of model work, observed by the ML worker.",
    ["task", "model", "priority"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
T = TypeVar("T")
R = TypeVar("R")
BATCHED_TASKS = frozenset({"embed"})
# Ours to decide, never passed through to the model: `stream` picks the call, not the payload.
_STREAM_PARAMS = ("stream", "stream_options")


class DeadlinePassed(Exception):  # control flow, not an error: the request expires
    """The request's deadline passed while it waited for the endpoint; no call was made."""


class RetryBudgetSpent(Exception):  # control flow: the request fails with what it has
    """The request's retry budget ended while it waited for the endpoint; no call was made."""

    def __init__(self, waiting_for: str) -> None:
        super().__init__(f"retry budget spent waiting for {waiting_for}")
        self.waiting_for = waiting_for


def _limit_passed(deadline_at: float | None, budget_end: float | None, waiting_for: str) -> Exception:
    """The exception for a wait that reached the earlier of the two limits."""
    if deadline_at is not None and (budget_end is None or deadline_at <= budget_end):
        return DeadlinePassed()
    return RetryBudgetSpent(waiting_for)


class Endpoint:
    """The call path of one route; see the module docstring."""

    def __init__(self, settings: Settings, route: Route, *, on_breaker_change: BreakerChange | None = None) -> None:
        self.settings = settings
        self.route = route
        self.task = route.task
        self.name = f"{route.task}/{route.model}"
        # Label lookups once per endpoint, not per message (prometheus' labels() hashes and locks).
        self.in_flight = metrics.IN_FLIGHT.labels(route.task)
        self.retries = metrics.RETRIES.labels(route.task)
        self._terminal: dict[str, Any] = {}
        self._queue_wait: dict[str, Any] = {}
        self.pool = BackendPool(settings, route, on_breaker_change=on_breaker_change)
        self.limiter = TokenBucket(route.rate_limit_rps)
        self.slots = asyncio.Semaphore(max(1, route.concurrency))
        self.retry = RetryPolicy(model_call(settings), max(0.0, route.retry_budget_s))
        self._batcher: Batcher | None = None

    @property
    def batched(self) -> bool:
        return self.task in BATCHED_TASKS

    async def call(
        self,
        fn: Callable[[Upstream], Awaitable[T]],
        deadline_at: float | None = None,
        budget: RetryBudget | None = None,
    ) -> tuple[T, str]:
        """One model call on the backend chosen for it: its answer and the backend's name.

        It starts ``budget``. Waits (slot, backends, rate limit) end at the earlier limit. A model
        error raised here carries the backend's name (``backend``).
        """
        budget_end = None if budget is None else budget.end
        limits = [t for t in (deadline_at, budget_end) if t is not None]
        limit = min(limits) if limits else None

        async def wait(step: Awaitable[R], waiting_for: str, free: bool) -> R:
            if free:  # it returns without suspending: no timer to arm (the check below still holds)
                return await step
            try:
                async with asyncio.timeout(None if limit is None else limit - clock.now()):
                    return await step
            except TimeoutError:
                raise _limit_passed(deadline_at, budget_end, waiting_for) from None

        await wait(self.slots.acquire(), "a free call slot", not self.slots.locked())
        try:
            picked = self.pool.pick()
            if picked is None:
                picked = await wait(self.pool.acquire(), "a backend's circuit breaker to close", False)
            upstream, probe = picked
            outcome = "cancelled"
            try:
                await wait(self.limiter.acquire(), "the rate limit", self.limiter.unlimited)
                if limit is not None and clock.now() >= limit:  # the waits above may not have blocked
                    raise _limit_passed(deadline_at, budget_end, "the endpoint")
                if budget is not None:
                    budget.start(clock.now())
                started = time.perf_counter()
                result = await fn(upstream)
                outcome = "ok"
            except (DeadlinePassed, RetryBudgetSpent):
                outcome = "not_called"
                raise
            except RetryableModelError as exc:
                outcome = "retryable"
                exc.backend = upstream.name
                self.pool.failed(upstream, probe)
                raise
            except FatalModelError as exc:
                # The backend answered: healthy as far as its breaker is concerned.
                outcome = "fatal"
                exc.backend = upstream.name
                self.pool.succeeded(upstream, probe)
                raise
            finally:
                if outcome != "not_called":
                    upstream.calls(outcome).inc()
                if outcome in ("cancelled", "not_called"):
                    self.pool.abandoned(upstream, probe)
        finally:
            self.slots.release()
        self.pool.succeeded(upstream, probe)
        upstream.seconds.observe(time.perf_counter() - started)
        return result, upstream.name

    def waited(self, priority: str, seconds: float) -> None:
        """Observe a request's queue wait (``inferstream_queue_wait_seconds``)."""
        child = self._queue_wait.get(priority)
        if child is None:
            child = self._queue_wait[priority] = QUEUE_WAIT.labels(self.task, self.route.model, str(priority))
        child.observe(max(0.0, seconds))

    def terminal(self, status: str) -> Any:
        """The terminal-status counter of this endpoint's task for ``status``."""
        child = self._terminal.get(status)
        if child is None:
            child = self._terminal[status] = metrics.TERMINAL.labels(self.task, status)
        return child

    def _batches(self) -> Batcher:
        if self._batcher is None:
            route = self.route

            async def run(texts: list[str]) -> Served:
                metrics.BATCH_SIZE.labels(route.model).observe(len(texts))
                (vectors, usage), backend = await self.call(lambda u: u.client.embed(u.spec.model, texts))
                return vectors, usage, backend

            self._batcher = Batcher(
                run,
                max_items=route.batch_size,
                max_wait_s=route.batch_wait_ms / 1000,
                max_in_flight=route.batch_concurrency,
                name=route.model,
            )
        return self._batcher

    async def infer(
        self,
        texts: list[str],
        params: dict[str, Any] | None,
        deadline_at: float | None = None,
        budget: RetryBudget | None = None,
        on_delta: OnDelta | None = None,
    ) -> tuple[dict[str, Any], Usage, str]:
        """One attempt for one request: its ``result``, ``usage`` and the backend that served it.

        With ``on_delta`` a generation is a streamed call and each piece of text goes to it
        as it arrives (``workers/streaming.py``); the result is the same either way.

        Raises :class:`DeadlinePassed` or :class:`RetryBudgetSpent` when a limit
        passed before the call went out. Generation joins several input strings
        with a newline into one prompt; a chat (``params["messages"]``, the Batch
        API's chat lines) is a ``/chat/completions`` call with the messages
        instead (:func:`bridges.clients.model.generation_call`), streamed or not. ``max_tokens`` defaults to
        ``settings.default_max_tokens``, the figure admission reserved, so usage
        never exceeds the estimate by default. An embedding shares its call with
        its batch: its budget starts when it joins one (a batch goes out within
        the route's batch wait) and only the budget bounds it; the worker checks
        the deadline between attempts.
        """
        if self.batched:
            if budget is not None:
                budget.start(clock.now())
            budget_end = None if budget is None else budget.end
            try:
                async with asyncio.timeout(None if budget_end is None else budget_end - clock.now()):
                    vectors, usage, backend = await self._batches().submit(texts)
            except TimeoutError:
                raise RetryBudgetSpent("a batched call") from None
            return {"embeddings": vectors}, usage, backend
        prompt = "\n".join(texts)
        merged = {"max_tokens": self.settings.default_max_tokens, **(params or {})}
        if "stream" in merged or "stream_options" in merged:
            for name in _STREAM_PARAMS:
                merged.pop(name, None)
        if on_delta is not None:
            streamed = on_delta
            (text, usage), backend = await self.call(
                lambda u: u.client.generate_stream(u.spec.model, prompt, merged, streamed), deadline_at, budget
            )
        else:
            (text, usage), backend = await self.call(
                lambda u: u.client.generate(u.spec.model, prompt, merged), deadline_at, budget
            )
        return {"text": text}, usage, backend

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
        await self.pool.close()

