"""The Python client of Inferstream's v1 HTTP API: :class:`AsyncClient`, the blocking :class:`Client`, typed answers and errors.

::

    async with AsyncClient("http://127.0.0.1:6066", api_key) as client:
        accepted = await client.submit("generate", "Hello")
        doc = await client.wait(accepted.request_id, timeout=60)

It imports only aiohttp and msgspec (never the server's Faust modules). The ``inferstream``
command (``inferstream.client.cli``) is built on it.
"""

from inferstream.client._async import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, AsyncClient
from inferstream.client._sync import Client
from inferstream.client.errors import (
    ApiError,
    AuthenticationError,
    BadRequest,
    Conflict,
    IdempotencyMismatch,
    InferstreamClientError,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    RequestQuotaExceeded,
    ServerError,
    TokenQuotaExceeded,
    TransportError,
    Unavailable,
    WaitTimeout,
)
from inferstream.client.models import (
    TERMINAL,
    Accepted,
    CancelAccepted,
    Event,
    Failure,
    Model,
    ModelList,
    Quota,
    QuotaCharge,
    RateLimits,
    RequestDoc,
    RequestPage,
    Result,
    StreamToken,
    Usage,
)

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "TERMINAL",
    "Accepted",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "CancelAccepted",
    "Client",
    "Conflict",
    "Event",
    "Failure",
    "IdempotencyMismatch",
    "InferstreamClientError",
    "Model",
    "ModelList",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "Quota",
    "QuotaCharge",
    "QuotaExceeded",
    "RateLimited",
    "RateLimits",
    "RequestDoc",
    "RequestPage",
    "RequestQuotaExceeded",
    "Result",
    "ServerError",
    "StreamToken",
    "TokenQuotaExceeded",
    "TransportError",
    "Unavailable",
    "Usage",
    "WaitTimeout",
]
