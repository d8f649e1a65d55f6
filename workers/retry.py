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

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from inferstream.errors import ModelError, RetryableModelError
from inferstream.settings import Settings

# Why retrying stopped: "deadline" ends as `expired`, the others as `failed` (dead-lettered).
GiveUp = Literal["fatal", "max_attempts", "retry_budget_spent", "deadline"]


@dataclass(frozen=True)
class Decision:
    """Retry after ``delay`` seconds, or (``delay is None``) stop for ``reason``."""

    delay: float | None
    reason: GiveUp | None = None

    @classmethod
    def stop(cls, reason: GiveUp) -> Decision:
        return cls(None, reason)


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
    """Attempt ``n`` (1-based) that failed waits ``uniform(0, min(cap, base * 2**(n-1)))``.

    A server's ``retry_after`` is added to that wait and may exceed ``cap``:
    retrying earlier than asked only earns another refusal, and the jitter on
    top keeps requests refused together from all coming back in the same
    instant. The request's limit bounds every wait, so one bad header parks a
    request no longer than its budget; a ``retry_after`` that ends past the
    limit stops retrying now.
    """

    base_s: float
    cap_s: float
    max_attempts: int
    budget_s: float
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, rng: random.Random | None = None) -> RetryPolicy:
        return cls(
            base_s=settings.ml_retry_base_s,
            cap_s=settings.ml_retry_max_s,
            max_attempts=max(1, settings.ml_max_attempts),
            budget_s=max(0.0, settings.ml_retry_budget_s),
            rng=rng or random.Random(),
        )

    def budget(self) -> RetryBudget:
        return RetryBudget(self.budget_s)

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt ``attempt``, before ``Retry-After`` and limits."""
        return self.rng.uniform(0.0, min(self.cap_s, self.base_s * (2 ** max(0, attempt - 1))))

    def decide(
        self, error: ModelError, attempt: int, *, now: float, budget_end: float, deadline_at: float | None = None
    ) -> Decision:
        """Whether (and when) to make attempt ``attempt + 1``; times are wall-clock seconds."""
        if not isinstance(error, RetryableModelError):
            return Decision.stop("fatal")
        if attempt >= self.max_attempts:
            return Decision.stop("max_attempts")
        limit: float = budget_end
        cut_by: GiveUp = "retry_budget_spent"
        if deadline_at is not None and deadline_at <= budget_end:
            limit, cut_by = deadline_at, "deadline"
        remaining = limit - now
        if remaining <= 0 or (error.retry_after is not None and error.retry_after >= remaining):
            return Decision.stop(cut_by)
        wait = self.backoff(attempt) + (error.retry_after or 0.0)
        return Decision(min(wait, remaining))


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
    if delay is not None:
        record["retry_in_s"] = round(delay, 4)
    return record
