"""Retry policy of model calls: a time budget from the first attempt, full-jitter backoff, ``Retry-After``.

A transient failure (:class:`RetryableModelError`) is retried while the
retry can start inside the request's limit: ``ml_retry_budget_s`` after its
first model call went out, or its deadline if that comes first. The budget
starts at the first call, not when the worker took the message, so a
prefetched message waiting for a call slot behind a backlog loses none of it;
from then on every wait (backoff, an open breaker, a slot) counts. The attempt count
(``ml_max_attempts``) is only a generous upper bound; time is what a client
waits for, so time is what bounds the retries. A fatal error stops at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tenacity import AsyncRetrying, RetryCallState

from inferstream import clock
from inferstream.errors import ModelError, RetryableModelError
from inferstream.retrying import Hook, Policy, model_call, retry_after
from inferstream.settings import Settings

# Why retrying stopped: "deadline" ends as `expired`, the others as `failed` (dead-lettered).
GiveUp = Literal["fatal", "max_attempts", "retry_budget_spent", "deadline"]


@dataclass
class RetryBudget:
    """One request's retry budget: ``seconds`` from its first model call (``start``)."""

    seconds: float
    started_at: float | None = None

    def start(self, now: float) -> float:
        """Start the budget if it has not started; returns its end."""
        if self.started_at is None:
            self.started_at = now
        return self.started_at + self.seconds

    def elapsed(self, now: float) -> float:
        return 0.0 if self.started_at is None else now - self.started_at

    @property
    def end(self) -> float | None:
        return None if self.started_at is None else self.started_at + self.seconds


@dataclass(frozen=True)
class RetryPolicy:
    """The model-call backoff (:func:`inferstream.retrying.model_call`) within a retry budget of ``budget_s``."""

    backoff: Policy
    budget_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(model_call(settings), max(0.0, settings.ml_retry_budget_s))

    def budget(self) -> RetryBudget:
        return RetryBudget(self.budget_s)

    def for_request(
        self, budget: RetryBudget, deadline_at: float | None, *, now: Callable[[], float] = clock.now
    ) -> RequestRetry:
        return RequestRetry(self.backoff, budget, deadline_at, now)


class RequestRetry:
    """One request's retries as tenacity ``stop`` and ``wait``; ``reason`` says why they stopped.

    Failed attempt ``n`` waits the policy's full-jitter backoff plus the server's ``retry_after``,
    which may exceed the cap: retrying earlier than asked only earns another refusal, and the
    jitter on top keeps requests refused together from all coming back in the same instant. The
    request's limit (the budget's end, or its deadline if earlier) bounds every wait, so one bad
    header parks a request no longer than its budget; a ``retry_after`` that ends past the limit
    stops retrying now, as does the attempt cap.
    """

    def __init__(
        self, backoff: Policy, budget: RetryBudget, deadline_at: float | None, now: Callable[[], float]
    ) -> None:
        self.policy = backoff
        self.budget = budget
        self.deadline_at = deadline_at
        self.reason: GiveUp | None = None
        self._now = now
        self._backoff = backoff.wait()
        self._stop_at_cap = backoff.stop()

    def _limit(self) -> tuple[float, GiveUp]:
        """Seconds left before the request's limit, and what that limit is."""
        now = self._now()
        end = self.budget.start(now)  # a call went out before it failed: the budget has started
        if self.deadline_at is not None and self.deadline_at <= end:
            return self.deadline_at - now, "deadline"
        return end - now, "retry_budget_spent"

    def stop(self, state: RetryCallState) -> bool:
        if self._stop_at_cap(state):
            self.reason = "max_attempts"
            return True
        remaining, cut_by = self._limit()
        asked = retry_after(state)
        if remaining <= 0 or (asked is not None and asked >= remaining):
            self.reason = cut_by
            return True
        return False

    def wait(self, state: RetryCallState) -> float:
        remaining, _ = self._limit()
        return max(0.0, min(self._backoff(state) + (retry_after(state) or 0.0), remaining))

    def retrying(self, before_sleep: Hook | None = None) -> AsyncRetrying:
        """Retries :class:`RetryableModelError`; any other error is raised at once (``fatal``)."""
        return self.policy.retrying(RetryableModelError, before_sleep=before_sleep, wait=self.wait, stop=self.stop)


def error_info(error: ModelError) -> dict[str, Any]:
    """The ``{"type", "message"}`` a failed event and a dead letter carry."""
    return {"type": error.type, "message": error.message}


def failure_info(
    error: dict[str, Any], reason: GiveUp, *, attempts: int, elapsed_s: float, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """A failed request's ``error``: the last error, why retrying stopped, and every attempt's failure."""
    return {**error, "reason": reason, "attempts": attempts, "elapsed_s": round(elapsed_s, 3), "history": history}


def attempt_record(attempt: int, at: float, error: ModelError, delay: float | None) -> dict[str, Any]:
    """One entry of a request's attempt history."""
    record: dict[str, Any] = {"attempt": attempt, "at": at, **error_info(error), "status": error.status}
    if error.backend is not None:
        record["backend"] = error.backend
    if delay is not None:
        record["retry_in_s"] = round(delay, 4)
    return record
