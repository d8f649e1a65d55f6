"""The gateway's mapping of the error tree to HTTP statuses, and the answers it builds from it."""

from __future__ import annotations

import orjson
import pytest

from inferstream.errors import (
    ClientError,
    Conflict,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PublicError,
    QuotaExceeded,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
)
from streams.gateway.errors import http_status
from streams.gateway.http import error_response


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ClientError("x"), 400),
        (InvalidRequest("x"), 400),
        (Unauthorized("x"), 401),
        (NotFound("x"), 404),
        (Conflict("x"), 409),
        (PayloadTooLarge("x"), 413),
        (IdempotencyMismatch("x"), 422),
        (QuotaExceeded("rate_limited", "x", retry_after=1), 429),
        (Unavailable("x"), 503),
        (StoreUnavailable("OSError: refused"), 503),
        (PublicError("x"), 500),  # left out of the mapping: our bug, never a client error
    ],
)
def test_each_error_has_its_status(exc: PublicError, status: int) -> None:
    assert http_status(exc) == status
    assert not hasattr(exc, "status")  # the error tree carries no HTTP status


def test_store_unavailable_is_a_503_with_retry_after_and_no_driver_detail() -> None:
    exc = StoreUnavailable("ConnectionRefusedError: [Errno 111] Connect call failed", retry_after=1.5)
    response = error_response(exc)
    assert response.status == 503 and response.headers["Retry-After"] == "2"
    assert response.body is not None
    assert orjson.loads(response.body) == {"error": {"type": "unavailable", "message": "PostgreSQL is unavailable"}}
    assert "Errno 111" in str(exc)  # the reason stays in logs


def test_quota_errors_keep_their_type_and_figures() -> None:
    exc = QuotaExceeded("token_quota_exceeded", "too many tokens", retry_after=30, tokens={"limit": 10})
    response = error_response(exc, {"X-RateLimit-Limit-Requests": "100"})
    assert response.status == 429 and response.headers["Retry-After"] == "30"
    assert response.headers["X-RateLimit-Limit-Requests"] == "100"
    assert response.body is not None
    assert orjson.loads(response.body)["error"]["tokens"] == {"limit": 10}
