"""Named retry policies (every retry and backoff goes through tenacity from here) and the one ``Retry-After`` parser."""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from inferstream.settings import Settings

__all__ = [
    "AGENT_BATCH",
    "DEAD_LETTER_RECORD",
    "Hook",
    "LOG_PRODUCE",
    "POSTGRES_LISTEN",
    "POSTGRES_WRITE",
    "REDIS_SUBSCRIBE",
    "REQUEST_PUBLISH",
    "TERMINAL_PUBLISH",
    "WEBHOOK_DELIVERY",
    "Policy",
    "any_error",
    "failure",
    "model_call",
    "next_sleep",
    "parse_retry_after",
    "retry_after",
]

Retryable = Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...]
"""What a policy retries: a predicate, or exception types."""
Hook = Callable[[RetryCallState], Awaitable[None] | None]
Sleep = Callable[[float], Awaitable[None]]
Wait = wait_base | Callable[[RetryCallState], float]
Stop = stop_base | Callable[[RetryCallState], bool]


@dataclass(frozen=True)
class Policy:
    """Full-jitter backoff from ``base_s`` doubling to ``cap_s``; ``max_attempts`` None retries until it works.

    After failed attempt ``n`` the wait is ``uniform(0, min(cap_s, base_s * 2**(n-1)))`` (AWS's
    "full jitter"): callers that failed together come back apart.
    """

    name: str
    base_s: float
    cap_s: float
    max_attempts: int | None = None

    def tuned(self, base_s: float, cap_s: float, max_attempts: int | None = None) -> Policy:
        """The same policy backing off from ``base_s`` to ``cap_s`` (and giving up after ``max_attempts``)."""
        return replace(self, base_s=base_s, cap_s=cap_s, max_attempts=max_attempts)

    def wait(self) -> wait_base:
        return wait_random_exponential(multiplier=self.base_s, max=self.cap_s)

    def stop(self) -> stop_base:
        return stop_never if self.max_attempts is None else stop_after_attempt(max(1, self.max_attempts))

    def retrying(
        self,
        retry: Retryable,
        *,
        before_sleep: Hook | None = None,
        sleep: Sleep = asyncio.sleep,
        wait: Wait | None = None,
        stop: Stop | None = None,
    ) -> AsyncRetrying:
        """An ``async for attempt in ...: with attempt:`` loop; gives up with tenacity's ``RetryError``.

        An error ``retry`` does not cover is raised as it is, at once. ``sleep`` may end early
        (a service stopping); ``wait`` and ``stop`` replace the policy's own.
        """
        predicate = (
            retry_if_exception_type(retry) if isinstance(retry, type | tuple) else retry_if_exception(retry)
        )
        return AsyncRetrying(
            retry=predicate,
            wait=wait if wait is not None else self.wait(),
            stop=stop if stop is not None else self.stop(),
            before_sleep=None if before_sleep is None else _awaiting(before_sleep),
            sleep=sleep,
        )


def _awaiting(hook: Hook) -> Callable[[RetryCallState], Awaitable[None]]:
    # tenacity awaits only coroutine functions: a lambda returning a coroutine would never run.
    async def run(state: RetryCallState) -> None:
        result = hook(state)
        if inspect.isawaitable(result):
            await result

    return run


# ---- the named policies: what each retries is said where it is used -------------

AGENT_BATCH = Policy("agent batch", 0.4, 30.0)
"""Any failure of an agent's batch, forever: Faust would ack a batch whose agent raised."""
POSTGRES_WRITE = Policy("sink write", 0.1, 5.0)
"""A sink batch while PostgreSQL is down, until it is committed or the sink stops."""
DEAD_LETTER_RECORD = Policy("dead letter record", 0.2, 5.0)
"""A dead letter while PostgreSQL is down, before its message is acked."""
POSTGRES_LISTEN = Policy("key notifications connect", 0.1, 2.0)
"""The LISTEN connection for key and plan changes, while PostgreSQL is down."""
LOG_PRODUCE = Policy("results to the log", 0.1, 5.0)
"""A batch of bridged results, any failure, forever: its RabbitMQ messages stay unacked."""
REQUEST_PUBLISH = Policy("requests to RabbitMQ", 0.1, 5.0)
"""A forwarded batch, until RabbitMQ confirms it (the partition waits: back-pressure)."""
TERMINAL_PUBLISH = Policy("terminal event to RabbitMQ", 0.05, 2.0)
"""A worker's terminal event (and dead letter), until confirmed; the work message waits unacked."""
REDIS_SUBSCRIBE = Policy("notification subscription", 0.1, 5.0)
"""The notification hub's pub/sub connection, forever; listeners poll meanwhile."""
WEBHOOK_DELIVERY = Policy("webhook delivery", 1.0, 60.0)
"""A webhook POST: connection errors, timeouts, 408, 429, 5xx; ``webhook_max_attempts``; ``Retry-After`` waited for."""


def model_call(settings: Settings) -> Policy:
    """A model call's backoff; the retry budget and the deadline bound it further (``workers/retry.py``)."""
    return Policy("model call", settings.ml_retry_base_s, settings.ml_retry_max_s, settings.ml_max_attempts)


def any_error(exc: BaseException) -> bool:
    """Every ``Exception``; never a cancellation (``asyncio.CancelledError`` is a ``BaseException``)."""
    return isinstance(exc, Exception)


def failure(state: RetryCallState) -> BaseException | None:
    """The exception the attempt that just failed raised."""
    return state.outcome.exception() if state.outcome is not None and state.outcome.failed else None


def next_sleep(state: RetryCallState) -> float:
    """The wait before the next attempt, inside a ``before_sleep`` hook."""
    return state.next_action.sleep if state.next_action is not None else 0.0


def retry_after(state: RetryCallState) -> float | None:
    """The ``retry_after`` seconds the failed attempt's exception carries, if any."""
    value = getattr(failure(state), "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


_DELAY_SECONDS = re.compile(r"\d+(\.\d+)?")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 10.2.3): delay-seconds or an HTTP-date.

    The three date forms are accepted (IMF-fixdate, RFC 850, asctime), all in GMT; a date in the
    past is 0. Fractional seconds are taken too; anything else (negative, ``inf``) is None.
    """
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # asctime carries no zone; HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
