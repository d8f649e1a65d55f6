"""What the client raises: the API's error bodies mapped to types, and transport failures apart.

::

    InferstreamClientError             root: every error the client raises on purpose
    ├── TransportError                 no answer: connection refused or broken, timed out (retryable)
    ├── ProtocolError                  an answer outside the contract (not JSON, wrong shape)
    ├── WaitTimeout                    wait() gave up before a terminal status (also a TimeoutError)
    └── ApiError                       an error body ``{"error": {"type", "message", ...}}``: status, type,
        │                                message, details, retry_after (from ``Retry-After``)
        ├── BadRequest                 400 invalid_request (``field`` names what is wrong)
        ├── AuthenticationError        401 unauthorized
        ├── NotFound                   404 not_found (unknown, or another user's)
        ├── Conflict                   409 conflict (``current_status``: already terminal)
        ├── PayloadTooLarge            413 payload_too_large (``limit``)
        ├── IdempotencyMismatch        422 idempotency_key_mismatch
        ├── QuotaExceeded              429, with ``requests``/``tokens`` charged and the X-RateLimit-* figures
        │   ├── RequestQuotaExceeded   request_quota_exceeded
        │   ├── TokenQuotaExceeded     token_quota_exceeded
        │   └── RateLimited            rate_limited
        ├── Unavailable                503 unavailable: not the caller's fault; try again after retry_after
        └── ServerError                another 5xx (internal_error: a server bug)

The body's ``type`` decides the class; the HTTP status only when the type is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from inferstream.client.models import QuotaCharge, RateLimits, RequestsCharge, TokensCharge


class InferstreamClientError(Exception):
    """Root of every error the client raises on purpose."""


class TransportError(InferstreamClientError):
    """The API could not be reached, or the connection broke before a whole answer arrived."""


class ProtocolError(InferstreamClientError):
    """The API answered something the contract does not describe."""


class WaitTimeout(InferstreamClientError, TimeoutError):
    """``wait()`` reached its timeout; ``last`` is the last state seen (None if none was)."""

    def __init__(self, request_id: str, timeout: float, last: Any = None) -> None:
        seen = f" (last seen {last.status})" if last is not None else ""
        super().__init__(f"{request_id} not finished after {timeout:g} s{seen}")
        self.request_id = request_id
        self.timeout = timeout
        self.last = last


class ApiError(InferstreamClientError):
    """The API answered an error: ``type`` and ``message`` from the body, its other keys in ``details``."""

    default_type: ClassVar[str] = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        details: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type or self.default_type
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


class BadRequest(ApiError):
    default_type = "invalid_request"

    @property
    def field(self) -> str | None:
        """The submission's field that is wrong (``input``, ``params.max_tokens``, ``callback_url``...)."""
        value = self.details.get("field")
        return value if isinstance(value, str) else None


class AuthenticationError(ApiError):
    default_type = "unauthorized"


class NotFound(ApiError):
    default_type = "not_found"


class Conflict(ApiError):
    default_type = "conflict"

    @property
    def current_status(self) -> str | None:
        """The terminal status the request already has."""
        value = self.details.get("status")
        return value if isinstance(value, str) else None


class PayloadTooLarge(ApiError):
    default_type = "payload_too_large"

    @property
    def limit(self) -> int | None:
        value = self.details.get("limit")
        return value if isinstance(value, int) else None


class IdempotencyMismatch(ApiError):
    default_type = "idempotency_key_mismatch"


class QuotaExceeded(ApiError):
    """429: ``retry_after`` says when the window (or the minute) resets; ``quota`` what was charged."""

    default_type = "quota_exceeded"

    @property
    def quota(self) -> QuotaCharge:
        try:
            return msgspec.convert(self.details, QuotaCharge)
        except msgspec.ValidationError:
            return QuotaCharge()

    @property
    def requests(self) -> RequestsCharge | None:
        return self.quota.requests

    @property
    def tokens(self) -> TokensCharge | None:
        return self.quota.tokens

    @property
    def rate_limits(self) -> RateLimits | None:
        return RateLimits.from_headers(self.headers)


class RequestQuotaExceeded(QuotaExceeded):
    default_type = "request_quota_exceeded"


class TokenQuotaExceeded(QuotaExceeded):
    default_type = "token_quota_exceeded"


class RateLimited(QuotaExceeded):
    default_type = "rate_limited"


class Unavailable(ApiError):
    """503: the API cannot decide now (rebalance, recovery, a store down); worth a retry after ``retry_after``."""

    default_type = "unavailable"


class ServerError(ApiError):
    default_type = "internal_error"


_BY_TYPE: dict[str, type[ApiError]] = {
    cls.default_type: cls
    for cls in (
        BadRequest,
        AuthenticationError,
        NotFound,
        Conflict,
        PayloadTooLarge,
        IdempotencyMismatch,
        RequestQuotaExceeded,
        TokenQuotaExceeded,
        RateLimited,
        Unavailable,
        ServerError,
    )
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationError,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: IdempotencyMismatch,
    429: QuotaExceeded,
    503: Unavailable,
}


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    """``Retry-After`` in seconds (the API sends whole seconds; an HTTP date is not used by it)."""
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> ApiError:
    """The typed error for an answer with an error ``status``; a body outside the contract still maps by status."""
    retry_after = retry_after_of(headers)
    detail: dict[str, Any] = {}
    try:
        decoded = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
        detail = dict(decoded["error"])
    type_ = detail.pop("type", None)
    message = detail.pop("message", None)
    if not isinstance(type_, str):
        type_ = None
    if not isinstance(message, str):
        message = body[:200].decode(errors="replace").strip() or f"HTTP {status}"
    cls = _BY_TYPE.get(type_ or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ApiError
    return cls(
        message, status=status, type=type_, details=detail, retry_after=retry_after, headers=headers
    )
