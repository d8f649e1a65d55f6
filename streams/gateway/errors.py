"""The HTTP status of each error the API reports: the error tree carries no statuses, the gateway maps them."""

from __future__ import annotations

from inferstream.errors import (
    ClientError,
    Conflict,
    DeadlineUnreachable,
    IdempotencyMismatch,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PublicError,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)

# Looked up along the error's class hierarchy, most specific first: StoreUnavailable answers as Unavailable.
STATUS: dict[type[PublicError], int] = {
    ClientError: 400,
    InvalidRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    IdempotencyMismatch: 422,
    QuotaExceeded: 429,
    DeadlineUnreachable: 429,
    Unavailable: 503,
}


def http_status(exc: PublicError) -> int:
    """The status ``exc`` is answered with; 500 for a PublicError left out of STATUS (our bug)."""
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500
