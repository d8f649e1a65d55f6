"""Retry policy of model calls: exponential backoff with full jitter that honours ``Retry-After``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from inferstream.errors import ModelError, RetryableModelError
from inferstream.settings import Settings


@dataclass(frozen=True)
class Backoff:
    """Attempt ``n`` (1-based) that failed waits ``uniform(0, min(cap, base * 2**(n-1)))``.

    A server's ``retry_after`` is a floor on the wait; ``cap`` bounds the result
    either way, so one bad header cannot park a request for an hour.
    """

    base_s: float
    cap_s: float
    max_attempts: int
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, rng: random.Random | None = None) -> Backoff:
        return cls(
            base_s=settings.ml_retry_base_s,
            cap_s=settings.ml_retry_max_s,
            max_attempts=max(1, settings.ml_max_attempts),
            rng=rng or random.Random(),
        )

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** max(0, attempt - 1)))
        wait = self.rng.uniform(0.0, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.cap_s)

    def should_retry(self, error: ModelError, attempt: int) -> bool:
        return isinstance(error, RetryableModelError) and attempt < self.max_attempts


def error_info(error: ModelError) -> dict[str, Any]:
    """The ``{"type", "message"}`` a failed event and a dead letter carry."""
    return {"type": error.type, "message": error.message}


def attempt_record(attempt: int, at: float, error: ModelError, delay: float | None) -> dict[str, Any]:
    """One entry of a request's attempt history."""
    record: dict[str, Any] = {"attempt": attempt, "at": at, **error_info(error), "status": error.status}
    if delay is not None:
        record["retry_in_s"] = round(delay, 4)
    return record
