"""Backoff with full jitter, Retry-After, and the retry decision."""

from __future__ import annotations

import random

from bridges.model import parse_retry_after
from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.settings import Settings
from workers.retry import Backoff, attempt_record


def test_delay_is_full_jitter_doubling_up_to_the_cap() -> None:
    b = Backoff(base_s=0.1, cap_s=1.0, max_attempts=5, rng=random.Random(1))
    for attempt, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [b.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the range


def test_retry_after_is_a_floor_bounded_by_the_cap() -> None:
    b = Backoff(base_s=0.01, cap_s=2.0, max_attempts=3)
    assert 1.5 <= b.delay(1, retry_after=1.5) <= 2.0
    assert b.delay(1, retry_after=60) == 2.0


def test_only_retryable_errors_retry_and_only_below_max_attempts() -> None:
    b = Backoff.from_settings(Settings(ml_max_attempts=3))
    err = RetryableModelError("busy", status=503)
    assert b.should_retry(err, 1) and b.should_retry(err, 2)
    assert not b.should_retry(err, 3)
    assert not b.should_retry(FatalModelError("bad", status=400), 1)


def test_attempt_record_carries_type_message_status() -> None:
    rec = attempt_record(2, 10.0, RetryableModelError("busy", status=429, retry_after=1), 0.5)
    assert rec == {"attempt": 2, "at": 10.0, "type": "model_http_429", "message": "busy", "status": 429, "retry_in_s": 0.5}


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
