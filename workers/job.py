"""One work message held by an ML worker: its attempts against the endpoint and its terminal event."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry.context import Context
from tenacity import RetryCallState, RetryError

from bridges.clients.model import is_chat
from inferstream import clock, tracing
from inferstream.errors import ModelError, RetryableModelError
from inferstream.retrying import failure, next_sleep
from schemas.records import InferenceRequest, ResultEvent
from workers.endpoint import DeadlinePassed, Endpoint, RetryBudgetSpent
from workers.retry import (
    GiveUp,
    RequestRetry,
    RetryBudget,
    RetryPolicy,
    attempt_record,
    error_info,
    failure_info,
)
from workers.streaming import OutputStream, sink, wants_stream

__all__ = ["Job"]

log = logging.getLogger(__name__)

_USAGE_ATTRIBUTES = (
    ("prompt_tokens", "gen_ai.usage.input_tokens"),
    ("completion_tokens", "gen_ai.usage.output_tokens"),
    ("total_tokens", "inferstream.usage.total_tokens"),
)


def _operation(batched: bool, params: dict[str, Any] | None) -> str:
    """The ``gen_ai.operation.name`` of a model call (OpenTelemetry's GenAI names)."""
    if batched:
        return "embeddings"
    return "chat" if is_chat(params) else "text_completion"


@dataclass(eq=False)
class Job:
    req: InferenceRequest
    message: AbstractIncomingMessage
    endpoint: Endpoint
    handler: asyncio.Task[Any] | None = None
    work: asyncio.Task[tuple[ResultEvent, bool]] | None = None
    cancel_requested: bool = False
    acking: bool = False  # its result is confirmed and its ack requested: never nack it any more
    started_at: float | None = None
    attempts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    backend: str | None = None  # the backend of the last attempt that reached one
    parent: Context | None = None  # tracing on: the forward span's context, from the work message
    output: OutputStream | None = None  # params.stream: where the deltas go (workers/streaming.py)

    async def run(self, policy: RetryPolicy) -> tuple[ResultEvent, bool]:
        """Attempts until an answer or a final failure: (terminal event, whether to dead-letter).

        The retry budget runs from the first model call; waits for an open breaker count against it.
        """
        try:
            return await self._run(policy)
        finally:
            if self.output is not None:
                self.output.close()  # cancelled or failed: no delta of it goes out any more

    async def _run(self, policy: RetryPolicy) -> tuple[ResultEvent, bool]:
        req = self.req
        budget = policy.budget()
        # Built once the first attempt failed: its tenacity wait and stop cost ~3% of the worker (py-spy).
        retry: RequestRetry | None = None
        last: dict[str, Any] | None = None
        out = sink()
        if out is not None and wants_stream(req.task, req.params):
            self.output = OutputStream(req.request_id, out)

        def retrying_in(state: RetryCallState) -> None:
            nonlocal last
            error = failure(state)
            assert isinstance(error, ModelError)
            self.backend = error.backend or self.backend
            self.history.append(attempt_record(self.attempts, clock.now(), error, next_sleep(state)))
            last = error_info(error)
            self.endpoint.retries.inc()

        async def attempt_once() -> tuple[ResultEvent, bool]:
            if req.deadline_at is not None and clock.now() >= req.deadline_at:
                return self.event("expired"), False
            self.attempts += 1
            on_delta = None
            if self.output is not None:
                await self.output.resume()
                self.output.new_attempt()
                on_delta = self.output.on_delta
            if tracing.ENABLED:
                return await self._traced_call(budget)
            result, usage, self.backend = await self.endpoint.infer(
                list(req.input), req.params, req.deadline_at, budget, on_delta
            )
            if self.output is not None:
                await self.output.drain()
            return self.event("completed", result=result, usage=usage or None), False

        try:
            # The first attempt runs without tenacity's per-attempt machinery (py-spy: ~5% of the
            # worker under load). A transient failure enters the loop as its first attempt, so
            # stop, wait, hooks and history are exactly the loop's; any other error is raised as
            # the loop would raise it.
            try:
                return await attempt_once()
            except RetryableModelError as exc:
                first: RetryableModelError | None = exc
            retry = policy.for_request(budget, req.deadline_at)
            async for attempt in retry.retrying(before_sleep=retrying_in):
                with attempt:
                    if first is not None:
                        failed, first = first, None
                        raise failed
                    return await attempt_once()
        except DeadlinePassed:
            self.attempts -= 1  # it expired waiting for the endpoint: no call was made
            return self.event("expired"), False
        except RetryBudgetSpent as spent:
            self.attempts -= 1
            error = last or {"type": "retry_budget_spent", "message": str(spent)}
            return self._failed(error, "retry_budget_spent", budget), True
        except ModelError as fatal:  # not retryable: raised at once
            return self._gave_up(fatal, "fatal", budget)
        except RetryError as stopped:
            err = stopped.last_attempt.exception()
            assert isinstance(err, ModelError) and retry is not None and retry.reason is not None
            return self._gave_up(err, retry.reason, budget)
        raise AssertionError("tenacity ended without an outcome")

    async def _traced_call(self, budget: RetryBudget) -> tuple[ResultEvent, bool]:
        """One attempt inside a ``model call`` span (under the current ``ml work`` span)."""
        req, endpoint = self.req, self.endpoint
        span = tracing.start(
            "model call", kind=tracing.SpanKind.CLIENT,
            attributes={
                "inferstream.request_id": req.request_id, "inferstream.route": endpoint.name,
                "gen_ai.operation.name": _operation(endpoint.batched, req.params),
                "gen_ai.request.model": req.model, "inferstream.attempt": self.attempts,
                # Texts this request sends; an embedding shares its model call with its batch's others.
                "inferstream.batch_size": len(req.input),
            },
        )  # fmt: skip
        with tracing.use(span):
            try:
                on_delta = None if self.output is None else self.output.on_delta
                result, usage, self.backend = await endpoint.infer(
                    list(req.input), req.params, req.deadline_at, budget, on_delta
                )
                if self.output is not None:
                    await self.output.drain()
            except ModelError as exc:
                span.set_attribute("inferstream.backend", exc.backend or "")
                raise
            span.set_attribute("inferstream.backend", self.backend or "")
            for key, name in _USAGE_ATTRIBUTES:
                if isinstance((usage or {}).get(key), int):
                    span.set_attribute(name, usage[key])
        return self.event("completed", result=result, usage=usage or None), False

    def _gave_up(self, error: ModelError, reason: GiveUp, budget: RetryBudget) -> tuple[ResultEvent, bool]:
        self.backend = error.backend or self.backend
        self.history.append(attempt_record(self.attempts, clock.now(), error, None))
        if reason == "deadline":
            return self.event("expired"), False
        return self._failed(error_info(error), reason, budget), True

    def _failed(self, error: dict[str, Any], reason: GiveUp, budget: RetryBudget) -> ResultEvent:
        elapsed = budget.elapsed(clock.now())
        log.warning(
            "request %s failed (%s) after %d attempts in %.1fs: %s",
            self.req.request_id, reason, self.attempts, elapsed, error.get("message"),
        )
        info = failure_info(error, reason, attempts=self.attempts, elapsed_s=elapsed, history=self.history)
        return self.event("failed", error=info)

    def event(self, status: str, **extra: Any) -> ResultEvent:
        # An expiry found before any attempt never ran; everything else says when work began.
        started = self.started_at if self.attempts else None
        return ResultEvent.for_request(
            self.req, status, at=clock.now(), attempts=self.attempts, history=self.history or None,
            started_at=started, backend=self.backend, **extra,
        )
