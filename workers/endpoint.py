"""One model endpoint (model base URL + task): its breaker, rate limit, concurrency limit and batchers.

Every model call goes through :meth:`Endpoint.call`, in this order: a
concurrency slot, the breaker (waits while open), a rate-limit token, the
request's deadline, the call. Taking the slot first means callers queued behind
a breaker that just opened do not rush the dead model when it is half-open.
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

from prometheus_client import Counter

from bridges.clients.model import ModelClient
from inferstream import clock
from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.settings import Settings
from workers import metrics
from workers.batching import Batcher, Usage, Vectors
from workers.breaker import STATE_VALUE, BreakerState, CircuitBreaker
from workers.ratelimit import TokenBucket
from workers.retry import RetryBudget

T = TypeVar("T")
R = TypeVar("R")
BATCHED_TASKS = frozenset({"embed"})


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
    """The call path of one task against the model service."""

    def __init__(
        self,
        settings: Settings,
        model: ModelClient,
        task: str,
        *,
        on_breaker_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.task = task
        self.name = f"{task}@{model.base_url}"
        self.label = task
        # Label lookups once per endpoint, not per message (prometheus' labels() hashes and locks).
        self.in_flight = metrics.IN_FLIGHT.labels(task)
        self.retries = metrics.RETRIES.labels(task)
        self._call_seconds = metrics.MODEL_CALL_SECONDS.labels(task)
        self._calls: dict[str, Any] = {}
        self._terminal: dict[str, Any] = {}

        def changed(name: str, old: BreakerState, new: BreakerState) -> None:
            metrics.BREAKER_STATE.labels(self.label).set(STATE_VALUE[new])
            if on_breaker_change is not None:
                on_breaker_change(name, old, new)

        self.breaker = CircuitBreaker(
            self.name, settings.ml_breaker_threshold, settings.ml_breaker_reset_s, on_change=changed
        )
        metrics.BREAKER_STATE.labels(self.label).set(0)
        self.limiter = TokenBucket(settings.ml_rate_limit_rps)
        self.slots = asyncio.Semaphore(max(1, settings.ml_concurrency))
        self._batchers: dict[str, Batcher] = {}

    @property
    def batched(self) -> bool:
        return self.task in BATCHED_TASKS

    async def call(
        self, fn: Callable[[], Awaitable[T]], deadline_at: float | None = None, budget: RetryBudget | None = None
    ) -> T:
        """One model call; it starts ``budget``. Waits (slot, breaker, rate limit) end at the earlier limit."""
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
            probe = await wait(
                self.breaker.acquire(), "the circuit breaker to close", self.breaker.state == "closed"
            )
            outcome = "cancelled"
            try:
                await wait(self.limiter.acquire(), "the rate limit", self.limiter.unlimited)
                if limit is not None and clock.now() >= limit:  # the waits above may not have blocked
                    raise _limit_passed(deadline_at, budget_end, "the endpoint")
                if budget is not None:
                    budget.start(clock.now())
                started = time.perf_counter()
                result = await fn()
                outcome = "ok"
            except (DeadlinePassed, RetryBudgetSpent):
                outcome = "not_called"
                raise
            except RetryableModelError:
                outcome = "retryable"
                self.breaker.on_failure(probe)
                raise
            except FatalModelError:
                # The endpoint answered: healthy as far as the breaker is concerned.
                outcome = "fatal"
                self.breaker.on_success(probe)
                raise
            finally:
                if outcome != "not_called":
                    self._counter(self._calls, metrics.MODEL_CALLS, outcome).inc()
                if outcome in ("cancelled", "not_called"):
                    self.breaker.release(probe)
        finally:
            self.slots.release()
        self.breaker.on_success(probe)
        self._call_seconds.observe(time.perf_counter() - started)
        return result

    def _counter(self, cache: dict[str, Any], family: Counter, value: str) -> Any:
        child = cache.get(value)
        if child is None:
            child = cache[value] = family.labels(self.label, value)
        return child

    def terminal(self, status: str) -> Any:
        """The terminal-status counter of this endpoint's task for ``status``."""
        return self._counter(self._terminal, metrics.TERMINAL, status)

    def _batcher(self, model: str) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:

            async def run(texts: list[str]) -> tuple[Vectors, Usage]:
                metrics.BATCH_SIZE.labels(model).observe(len(texts))
                return await self.call(lambda: self.model.embed(model, texts))

            batcher = self._batchers[model] = Batcher(
                run,
                max_items=self.settings.ml_batch_size,
                max_wait_s=self.settings.ml_batch_wait_ms / 1000,
                max_in_flight=self.settings.ml_batch_concurrency,
                name=model,
            )
        return batcher

    async def infer(
        self,
        model: str,
        texts: list[str],
        params: dict[str, Any] | None,
        deadline_at: float | None = None,
        budget: RetryBudget | None = None,
    ) -> tuple[dict[str, Any], Usage]:
        """One attempt for one request: its ``result`` and ``usage``.

        Raises :class:`DeadlinePassed` or :class:`RetryBudgetSpent` when a limit
        passed before the call went out. Generation joins several input strings
        with a newline into one prompt. ``max_tokens`` defaults to
        ``settings.default_max_tokens``, the figure admission reserved, so usage
        never exceeds the estimate by default. An embedding shares its call with
        its batch: its budget starts when it joins one (a batch goes out within
        ``ml_batch_wait_ms``) and only the budget bounds it; the worker checks
        the deadline between attempts.
        """
        if self.batched:
            if budget is not None:
                budget.start(clock.now())
            budget_end = None if budget is None else budget.end
            try:
                async with asyncio.timeout(None if budget_end is None else budget_end - clock.now()):
                    vectors, usage = await self._batcher(model).submit(texts)
            except TimeoutError:
                raise RetryBudgetSpent("a batched call") from None
            return {"embeddings": vectors}, usage
        prompt = "\n".join(texts)
        merged = {"max_tokens": self.settings.default_max_tokens, **(params or {})}
        text, usage = await self.call(lambda: self.model.generate(model, prompt, merged), deadline_at, budget)
        return {"text": text}, usage

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
