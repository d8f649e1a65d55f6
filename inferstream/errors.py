"""The one error tree of Inferstream: the errors, and the data they carry (no HTTP statuses: the gateway maps them).

::

    InferstreamError
    ├── PublicError                    reported to the caller: type, message, details, retry_after
    │   ├── ClientError                the caller sent something wrong, or more than its plan allows
    │   │   ├── InvalidRequest         invalid_request
    │   │   ├── Unauthorized           unauthorized
    │   │   ├── NotFound               not_found
    │   │   ├── Conflict               conflict
    │   │   ├── PayloadTooLarge        payload_too_large
    │   │   ├── IdempotencyMismatch    idempotency_key_mismatch
    │   │   ├── QuotaExceeded          request_quota_exceeded | token_quota_exceeded | rate_limited (retry_after)
    │   │   └── DeadlineUnreachable    deadline_unreachable: the queue's ETA exceeds deadline_s (eta_s, retry_after)
    │   └── Unavailable                unavailable: retryable, not the caller's fault (retry_after)
    │       └── StoreUnavailable       PostgreSQL unreachable, restarting or overloaded (broken_connection)
    ├── ConfigurationError             a worker refuses to start: the message names what to change
    │   ├── TopologyError              a topic's partition count breaks co-partitioning (topic, expected, actual)
    │   └── RoutesError                the routes file does not validate (problems: file, line, field; in inferstream.routes)
    └── ModelError                     a model call failed (status: the model service's HTTP status, if any; backend)
        ├── RetryableModelError        timeouts, connection errors, 408, 409, 425, 429, 5xx (retry_after)
        └── FatalModelError            other 4xx, malformed answers: fail at once

Defined beside the code that raises them, also directly under ``InferstreamError``:
``bridges.clients.redis.CacheUnavailable``, ``bridges.clients.rabbitmq.PublishError`` and ``UnknownRoute``,
``bridges.sink.SinkStopped``, ``inferstream.egress.EgressRefused``, ``devtools.localbroker.BrokerError``.
"""

from __future__ import annotations

from typing import Any


class InferstreamError(Exception):
    """Root of every error Inferstream raises on purpose."""


class PublicError(InferstreamError):
    """An error the API reports to its caller as ``{"error": {"type", "message", **details}}``."""

    type = "invalid_request"

    def __init__(self, message: str, *, retry_after: float | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, **self.details}}


class ClientError(PublicError):
    """The caller sent something wrong, or asked for more than its plan allows."""


class InvalidRequest(ClientError):
    type = "invalid_request"


class Unauthorized(ClientError):
    type = "unauthorized"


class NotFound(ClientError):
    type = "not_found"


class Conflict(ClientError):
    type = "conflict"


class PayloadTooLarge(ClientError):
    type = "payload_too_large"


class IdempotencyMismatch(ClientError):
    type = "idempotency_key_mismatch"


class QuotaExceeded(ClientError):
    def __init__(self, type_: str, message: str, *, retry_after: float, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.type = type_


class DeadlineUnreachable(ClientError):
    """The route's queue would start the request after its ``deadline_s``: refused before anything is charged."""

    type = "deadline_unreachable"

    def __init__(self, message: str, *, eta_s: float, deadline_s: int, retry_after: float, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, eta_s=eta_s, deadline_s=deadline_s, **details)
        self.eta_s = eta_s


class Unavailable(PublicError):
    """Not the caller's fault and worth another try after ``retry_after`` seconds."""

    type = "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)


class StoreUnavailable(Unavailable):
    """PostgreSQL cannot answer now: unreachable, restarting, overloaded, or the connection broke.

    ``message`` is safe to show a caller; ``str()`` adds the driver's reason, for logs.
    ``broken_connection`` says the pool is not worth keeping (reset it before the next try).
    """

    def __init__(
        self, reason: str, *, retry_after: float = 1.0, broken_connection: bool = False
    ) -> None:
        super().__init__("PostgreSQL is unavailable", retry_after=retry_after)
        self.args = (f"PostgreSQL is unavailable: {reason}",)
        self.reason = reason
        self.broken_connection = broken_connection


class ConfigurationError(InferstreamError):
    """The deployment cannot run as configured (a worker refuses to start); the message says what to change."""


class TopologyError(ConfigurationError):
    """The log's topics do not match the configuration: a wrong partition count breaks co-partitioning."""

    def __init__(self, message: str, *, topic: str, expected: int | None = None, actual: int | None = None) -> None:
        super().__init__(message)
        self.topic, self.expected, self.actual = topic, expected, actual


class ModelError(InferstreamError):
    """A model call failed. ``status`` is the model service's HTTP status if there was one."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.backend: str | None = None  # which backend of the route failed; set by the ML worker

    @property
    def type(self) -> str:
        return "model_error" if self.status is None else f"model_http_{self.status}"


class RetryableModelError(ModelError):
    """Worth another attempt: timeouts, connection errors, 408, 409, 425, 429 and 5xx."""


class FatalModelError(ModelError):
    """Another attempt would fail the same way: 4xx other than 429, bad answers."""
