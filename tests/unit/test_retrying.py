"""The named retry policies: full-jitter backoff, what is retried, hooks, and the one Retry-After parser."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import AsyncRetrying, RetryCallState, RetryError

from inferstream.retrying import (
    AGENT_BATCH,
    Policy,
    any_error,
    next_sleep,
    parse_retry_after,
    retry_after,
)


def failed(attempt: int, error: BaseException) -> RetryCallState:
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


def test_backoff_is_full_jitter_doubling_up_to_the_cap() -> None:
    wait = Policy("p", 0.1, 1.0).wait()
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0), (2000, 1.0)]:
        delays = [wait(failed(attempt, OSError())) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the range


def test_tuned_keeps_the_name_and_changes_the_numbers() -> None:
    tuned = AGENT_BATCH.tuned(0.01, 0.02, 3)
    assert (tuned.name, tuned.base_s, tuned.cap_s, tuned.max_attempts) == (AGENT_BATCH.name, 0.01, 0.02, 3)


async def test_retries_what_it_is_told_hooks_may_be_lambdas_returning_coroutines() -> None:
    calls, hooked = 0, []

    async def note(state: RetryCallState) -> None:
        hooked.append((state.attempt_number, next_sleep(state)))

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("down")
        return "ok"

    async for attempt in Policy("p", 0.001, 0.002).retrying(OSError, before_sleep=lambda s: note(s)):
        with attempt:
            result = await flaky()
    assert result == "ok" and calls == 3
    assert [n for n, _ in hooked] == [1, 2] and all(0 <= d <= 0.002 for _, d in hooked)


async def test_other_errors_raise_at_once_and_the_attempt_cap_gives_up() -> None:
    with pytest.raises(ValueError, match="bug"):
        async for attempt in Policy("p", 0.001, 0.001).retrying(OSError):
            with attempt:
                raise ValueError("bug")
    with pytest.raises(RetryError) as gave_up:
        async for attempt in Policy("p", 0.001, 0.001, max_attempts=2).retrying(OSError):
            with attempt:
                raise OSError("down")
    assert gave_up.value.last_attempt.attempt_number == 2


def test_any_error_never_retries_a_cancellation() -> None:
    assert any_error(RuntimeError()) and not any_error(asyncio.CancelledError())


def test_retry_after_reads_the_failure() -> None:
    class Busy(Exception):
        retry_after = 2.5

    assert retry_after(failed(1, Busy())) == 2.5 and retry_after(failed(1, OSError())) is None


NOW = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example date


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("Sun, 06 Nov 1994 08:50:37 GMT", 60.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:50:37 GMT", 60.0),  # obsolete RFC 850
        ("Sun Nov  6 08:50:37 1994", 60.0),  # obsolete asctime, GMT though it says no zone
        ("Sun, 06 Nov 1994 08:48:37 GMT", 0.0),  # in the past: now
        (None, None),
        ("", None),
        ("soon", None),
        ("-1", None),
        ("inf", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds
