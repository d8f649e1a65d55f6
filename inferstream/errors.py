"""The one error tree of Inferstream.

::

    InferstreamError
    ├── ClientError                    (the caller sent something wrong; maps to 4xx)
    │   ├── InvalidRequest             400 invalid_request
    │   ├── Unauthorized               401 unauthorized
    │   ├── NotFound                   404 not_found
    │   ├── Conflict                   409 conflict
    │   ├── PayloadTooLarge            413 payload_too_large
    │   ├── IdempotencyMismatch        422 idempotency_key_mismatch
    │   └── QuotaExceeded              429 request_quota_exceeded | token_quota_exceeded | rate_limited
    ├── Unavailable                    503 unavailable (retry_after): admission cannot be decided now
    ├── ConfigurationError             a worker refuses to start: the message names what to change
    │   └── TopologyError              a topic's partition count breaks co-partitioning (topic, expected, actual)
    └── ModelError                     a model call failed
        ├── RetryableModelError        timeouts, connection errors, 408, 409, 425, 429, 5xx (retry_after)
        └── FatalModelError            other 4xx, malformed answers: fail at once

Errors carry their data: ``retry_after`` seconds, the quota figures, the status.
"""

from __future__ import annotations

from typing import Any


class InferstreamError(Exception):
    """Root of every error Inferstream raises on purpose."""


class ClientError(InferstreamError):
    status = 400
    type = "invalid_request"

    def __init__(self, message: str, *, retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.details}}


class InvalidRequest(ClientError):
    status, type = 400, "invalid_request"


class Unauthorized(ClientError):
    status, type = 401, "unauthorized"


class NotFound(ClientError):
    status, type = 404, "not_found"


class Conflict(ClientError):
    status, type = 409, "conflict"


class PayloadTooLarge(ClientError):
    status, type = 413, "payload_too_large"


class IdempotencyMismatch(ClientError):
    status, type = 422, "idempotency_key_mismatch"


class QuotaExceeded(ClientError):
    status = 429

    def __init__(self, type_: str, message: str, *, retry_after: float, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.type = type_


class Unavailable(ClientError):
    """Not the client's fault, but answered like a client error: 503 with Retry-After."""

    status, type = 503, "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)


class ConfigurationError(InferstreamError):
    """The deployment cannot run as configured (a worker refuses to start); the message says what to change."""


class TopologyError(ConfigurationError):
    """The log's topics do not match the configuration: a wrong partition count breaks co-partitioning."""

    def __init__(self, message: str, *, topic: str, expected: int | None = None, actual: int | None = None) -> None:
        super().__init__(message)
        self.topic, self.expected, self.actual = topic, expected, actual


class ModelError(InferstreamError):
    """A model call failed. ``status`` is the HTTP status if there was one."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return "model_error" if self.status is None else f"model_http_{self.status}"


class RetryableModelError(ModelError):
    """Worth another attempt: timeouts, connection errors, 408, 409, 425, 429 and 5xx."""


class FatalModelError(ModelError):
    """Another attempt would fail the same way: 4xx other than 429, bad answers."""
