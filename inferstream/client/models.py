"""The API's answers as typed models (msgspec), decoded by the client.

They mirror ``schemas/documents.py`` (the server's contract), but that module pulls in the
server (Faust records); a unit test holds the two in step, field by field. Unknown keys are
ignored, so a newer server's additions never break an older client. Timestamps decode to
timezone-aware ``datetime``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import msgspec
from msgspec import Struct

Status = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled", "expired"]
Task = Literal["generate", "embed"]
Priority = Literal["low", "normal", "high"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})


class _Answer(Struct, omit_defaults=True):
    """Base of the answers: encoding one (the CLI's output) leaves out what the server did not send."""


class Links(_Answer):
    self_: str = msgspec.field(name="self")
    events: str


class RateLimits(_Answer):
    """The ``X-RateLimit-*`` headers of a submission's answer (202 or 429)."""

    limit_requests: int
    remaining_requests: int
    limit_tokens: int
    remaining_tokens: int
    reset_s: int

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimits | None:
        names = {
            "limit_requests": "X-RateLimit-Limit-Requests",
            "remaining_requests": "X-RateLimit-Remaining-Requests",
            "limit_tokens": "X-RateLimit-Limit-Tokens",
            "remaining_tokens": "X-RateLimit-Remaining-Tokens",
            "reset_s": "X-RateLimit-Reset",
        }
        try:
            return cls(**{attr: int(headers[header]) for attr, header in names.items()})
        except (KeyError, ValueError):
            return None


class Accepted(_Answer):
    """202 to a submission. ``replayed`` and ``rate_limits`` come from the answer's headers."""

    request_id: str
    status: Status
    estimated_tokens: int
    created_at: datetime
    links: Links
    replayed: bool = False  # Idempotent-Replayed: the first answer to this Idempotency-Key
    rate_limits: RateLimits | None = None


class Result(_Answer):
    """``text`` for generate, ``embeddings`` for embed."""

    text: str | None = None
    embeddings: list[list[float]] | None = None


class Failure(_Answer):
    """Why a request failed; a model failure adds the attempts and their history."""

    type: str
    message: str
    reason: str | None = None
    attempts: int | None = None
    elapsed_s: float | None = None
    history: list[dict[str, Any]] | None = None


class Usage(_Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QueuePlace(_Answer):
    """Where a waiting request stands in its route's queue, and the seconds until it starts (None: not measured yet)."""

    position: int
    ahead: int
    eta_s: float | None = None


class RequestDoc(_Answer):
    """One request: ``GET /v1/requests/{id}``, list items, and the data of each event."""

    request_id: str
    status: Status
    task: Task
    model: str
    priority: Priority
    created_at: datetime
    updated_at: datetime
    estimated_tokens: int
    attempts: int
    completed_at: datetime | None = None
    result: Result | None = None
    error: Failure | None = None
    usage: Usage | None = None
    metadata: dict[str, Any] | None = None
    backend: str | None = None
    queue: QueuePlace | None = None  # while queued or dispatched

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class CancelAccepted(RequestDoc):
    """202 to a cancellation: the document before it takes effect."""

    cancel_requested: bool = True


class RequestPage(_Answer):
    """A page of ``GET /v1/requests``, newest first; ``next_after`` asks for the next one."""

    data: list[RequestDoc]
    has_more: bool
    next_after: str | None


class Window(_Answer):
    start: datetime
    reset_at: datetime


class RequestCounts(_Answer):
    used: int
    limit: int
    remaining: int


class TokenCounts(_Answer):
    used: int
    reserved: int
    limit: int
    remaining: int


class Quota(_Answer):
    """``GET /v1/quota``: the caller's UTC-day window."""

    user_id: str
    plan: str
    window: Window
    requests: RequestCounts
    tokens: TokenCounts


class RequestsCharge(_Answer):
    used: int
    limit: int


class TokensCharge(_Answer):
    used: int
    reserved: int
    limit: int
    estimated: int


class QuotaCharge(_Answer):
    """What a 429's body says was charged when the submission was refused."""

    requests: RequestsCharge | None = None
    tokens: TokensCharge | None = None


class Model(_Answer):
    """One route that accepts submissions: OpenAI's model object plus its task, default and top priority."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Task
    default: bool
    max_priority: Priority


class ModelList(_Answer):
    object: Literal["list"]
    data: list[Model]


class StreamToken(_Answer):
    """201 to ``POST /v1/requests/{id}/events/token``: hand ``events_url`` (relative) to a browser's
    ``EventSource``, or pass ``token`` to :meth:`AsyncClient.events`; it opens one request's stream,
    without an API key, until ``expires_at`` (Unix seconds)."""

    token: str
    expires_at: float
    ttl_s: float
    events_url: str


class Event(_Answer):
    """One server-sent event: ``id`` increases along the lifecycle, ``data`` is the request's document.

    ``snapshot`` says the server could not replay what came after the last id this client saw,
    so statuses in between may be missing.
    """

    id: int
    event: str
    data: RequestDoc
    snapshot: bool = False

    @property
    def terminal(self) -> bool:
        return self.data.terminal
