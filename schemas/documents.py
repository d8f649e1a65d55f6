"""The public response documents: typed models (msgspec) for the contract, and the request document's builder.

:func:`request_doc` reads a mapping shaped like a row of the ``requests`` table
(see ``schemas/migrations``): timestamps may be ``datetime`` or epoch seconds,
JSON columns may be already-decoded objects or JSON text. Its output is what
:class:`RequestDoc` describes (a unit test holds them together).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import UNSET, Meta, Struct, UnsetType

from schemas.records import STATUS_RANK, Priority, Status, Task

REQUEST_ID_PATTERN = "^req_[0-9a-fA-F]{24}$"
RequestId = Annotated[str, Meta(pattern=REQUEST_ID_PATTERN, description="Sorts by creation time.")]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]


class Links(Struct):
    self_: str = msgspec.field(name="self")
    events: str


class Accepted(Struct):
    """202 to ``POST /v1/requests``."""

    request_id: RequestId
    status: Literal["queued"]
    estimated_tokens: int
    created_at: Timestamp
    links: Links


class Result(Struct):
    """``text`` for generate, ``embeddings`` for embed."""

    text: str | UnsetType = UNSET
    embeddings: list[list[float]] | UnsetType = UNSET


class Failure(Struct):
    type: str
    message: str


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class QueuePlace(Struct):
    """Where a waiting request stands in its route's queue (streams/queue_eta.py)."""

    position: int
    ahead: int
    eta_s: float | None


class RequestDoc(Struct):
    """``GET /v1/requests/{id}``, the items of a list page and the data of each SSE event."""

    request_id: RequestId
    status: Status
    task: Task
    model: str
    priority: Priority
    created_at: Timestamp
    updated_at: Timestamp
    estimated_tokens: int
    attempts: int
    completed_at: Timestamp | UnsetType = UNSET
    result: Result | UnsetType = UNSET
    error: Failure | UnsetType = UNSET
    usage: Usage | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    # Which backend of the route served it (on a failure, the last one tried); the routes file names them.
    backend: str | UnsetType = UNSET
    # While `queued` or `dispatched`: its place in the route's queue and the seconds until it starts.
    queue: QueuePlace | UnsetType = UNSET


class CancelAccepted(RequestDoc):
    """202 to ``DELETE /v1/requests/{id}``: the document before the cancellation takes effect."""

    cancel_requested: bool = True


class RequestPage(Struct):
    """``GET /v1/requests``: newest first; pass ``next_after`` as ``after`` for the next page."""

    data: list[RequestDoc]
    has_more: bool
    next_after: RequestId | None


class Window(Struct):
    start: Timestamp
    reset_at: Timestamp


class RequestCounts(Struct):
    used: int
    limit: int
    remaining: int


class TokenCounts(Struct):
    used: int
    reserved: int
    limit: int
    remaining: int


class QuotaDoc(Struct):
    """``GET /v1/quota``: the caller's UTC-day window."""

    user_id: str
    plan: str
    window: Window
    requests: RequestCounts
    tokens: TokenCounts


class ErrorDetail(Struct):
    type: str
    message: str
    field: str | UnsetType = UNSET


class ErrorBody(Struct):
    """Every error: ``type`` says which; other keys carry its data."""

    error: ErrorDetail


class RequestsCharged(Struct):
    used: int
    limit: int


class TokensCharged(Struct):
    used: int
    reserved: int
    limit: int
    estimated: int


class QuotaErrorDetail(ErrorDetail):
    requests: RequestsCharged | UnsetType = UNSET
    tokens: TokensCharged | UnsetType = UNSET
    # deadline_unreachable: the route's ETA now, the deadline asked for, and the queue it measured
    eta_s: float | UnsetType = UNSET
    deadline_s: int | UnsetType = UNSET
    queue: QueuePlace | UnsetType = UNSET


class QuotaErrorBody(Struct):
    """429: ``request_quota_exceeded``, ``token_quota_exceeded``, ``rate_limited`` or ``deadline_unreachable``."""

    error: QuotaErrorDetail


class ModelEntry(Struct):
    """One public route: OpenAI's model object, with the route's task, whether it is the task's default,
    and the highest priority it accepts (a higher one is capped)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    task: Task
    default: bool
    max_priority: Priority


class ModelList(Struct):
    """``GET /v1/models``: the routes that accept submissions now, in the routes file's order."""

    object: Literal["list"]
    data: list[ModelEntry]


class StreamToken(Struct):
    """201 to ``POST /v1/requests/{id}/events/token``: open ``events_url`` (relative) with ``EventSource``."""

    token: str
    expires_at: Annotated[float, Meta(description="Unix seconds; the stream must be opened before then.")]
    ttl_s: float
    events_url: str


WebhookEvent = Literal["dispatched", "running", "output", "completed", "failed", "cancelled", "expired"]


class WebhookAttemptDoc(Struct):
    """One delivery attempt of one webhook event."""

    at: Timestamp
    event: WebhookEvent
    webhook_id: Annotated[str, Meta(description="The `webhook-id` header: the same on each retry and redelivery of an event.")]
    attempt: Annotated[int, Meta(description="1 for the first try of this delivery, counting retries.")]
    state: Annotated[Literal["pending", "delivered", "failed"], Meta(description="pending: a retry is due.")]
    http_status: int | None
    error: str | None


class WebhookAttempts(Struct):
    """``GET /v1/requests/{id}/webhooks``: the delivery attempts, oldest first (the newest 100)."""

    data: list[WebhookAttemptDoc]


class RedeliveryAccepted(Struct):
    """202 to ``POST /v1/requests/{id}/webhooks/redeliver``: the event being sent again."""

    request_id: RequestId
    event: WebhookEvent
    webhook_id: str


def attempt_doc(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``webhook_attempts`` row as :class:`WebhookAttemptDoc` describes it."""
    return {"at": iso_ts(row["at"]), "event": row["event"], "webhook_id": row["webhook_id"],
            "attempt": int(row["attempt"]), "state": row["state"], "http_status": row.get("http_status"),
            "error": row.get("error")}  # fmt: skip


# Columns of the requests table, in order; the PostgreSQL store reads and writes these.
REQUEST_COLUMNS: tuple[str, ...] = (
    "request_id",
    "user_id",
    "task",
    "model",
    "priority",
    "status",
    "status_rank",
    "input",
    "params",
    "metadata",
    "estimated_tokens",
    "attempts",
    "result",
    "error",
    "usage",
    "created_at",
    "updated_at",
    "dispatched_at",
    "started_at",
    "completed_at",
    "deadline_at",
    "callback_url",
    "quota_day",
    "history",
    "backend",
    "webhook_events",
)


def iso_ts(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        dt = datetime.fromtimestamp(float(value), UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return orjson.loads(value)
    return value


def request_doc(row: Mapping[str, Any]) -> dict[str, Any]:
    """The contract's document; optional keys appear only when they have a value."""
    doc: dict[str, Any] = {
        "request_id": row["request_id"],
        "status": row["status"],
        "task": row["task"],
        "model": row["model"],
        "priority": row["priority"],
        "created_at": iso_ts(row["created_at"]),
        "updated_at": iso_ts(row.get("updated_at") or row["created_at"]),
        "estimated_tokens": int(row.get("estimated_tokens") or 0),
        "attempts": int(row.get("attempts") or 0),
    }
    if row.get("completed_at") is not None:
        doc["completed_at"] = iso_ts(row["completed_at"])
    for key in ("result", "error", "usage"):
        value = _json(row.get(key))
        if value is not None:
            doc[key] = value
    metadata = _json(row.get("metadata"))
    if metadata:
        doc["metadata"] = metadata
    if row.get("backend"):
        doc["backend"] = row["backend"]
    return doc


def event_id(status: str) -> int:
    """SSE ``id:`` of a status event: its rank, increasing along the lifecycle."""
    return STATUS_RANK[status]


# What only a terminal state has: an earlier state's document never shows them.
_OUTCOME_FIELDS = frozenset({"result", "error", "usage", "completed_at", "backend"})
# What tells an earlier state's document apart from a later one of the same request.
STEP_FIELDS = ("status", "updated_at", "attempts")


def step_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``doc`` that :func:`doc_at` needs to rebuild it from a later document."""
    return {name: doc[name] for name in STEP_FIELDS if name in doc}


def doc_at(later: Mapping[str, Any], step: Mapping[str, Any]) -> dict[str, Any]:
    """The document of an earlier, non-terminal state, rebuilt from a later document and its step.

    The rest of a document does not change along the lifecycle, so an event history can
    keep a few bytes per state instead of a whole document.
    """
    then = {k: v for k, v in later.items() if k not in _OUTCOME_FIELDS}
    then.update(step)
    return then


def earlier_doc(row: Mapping[str, Any], status: str, at: Any) -> dict[str, Any]:
    """The document of ``row`` as it was at an earlier, non-terminal ``status`` reached at ``at``.

    A sink batch can carry a request through several statuses at once and store only the
    last; this rebuilds what the intermediate ones looked like, so each can be announced.
    """
    return doc_at(request_doc(row), {"status": status, "updated_at": iso_ts(at), "attempts": 0})
