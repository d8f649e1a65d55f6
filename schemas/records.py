"""The records that travel through the log and RabbitMQ: the pipeline's contracts.

Both are keyed by ``user_id`` in the log, so the requests topic, the results
topic and the quota table's changelog are co-partitioned. New fields must have
defaults: a record already in the log must still decode after a change. The
enum-typed fields hold the enums' string values on the wire; Faust does not
coerce on decode, so a decoded field is the plain string, equal to its member.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import faust
import orjson


class Status(StrEnum):
    """A request's lifecycle: ``queued`` -> ``dispatched`` -> ``running`` -> one terminal status."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


class Task(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"


# Keyed by the enums' members, which hash and compare as their strings: plain ``str`` lookups work.
TERMINAL: frozenset[str] = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})
STATUS_RANK: dict[str, int] = {
    Status.QUEUED: 1,
    Status.DISPATCHED: 2,
    Status.RUNNING: 3,
    Status.COMPLETED: 4,
    Status.FAILED: 4,
    Status.CANCELLED: 4,
    Status.EXPIRED: 4,
}
PRIORITY_LEVEL: dict[str, int] = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2}


class InferenceRequest(
    faust.Record,
    namespace="inferstream.InferenceRequest",
    serializer="json",
    include_metadata=False,
):
    """An admitted request, as written to the requests topic and the work queue."""

    request_id: str
    user_id: str
    task: Task
    model: str
    input: list[str]
    estimated_tokens: int
    created_at: float
    quota_day: str
    priority: Priority = Priority.NORMAL
    params: dict[str, Any] | None = None
    deadline_at: float | None = None
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None
    input_is_list: bool = False
    # Set by `faust -A streams redrive` only (never from a submission): the request re-runs a dead
    # letter and was not admitted, so the quota table neither confirms nor charges it.
    redrive_of: str | None = None
    # When the forward agent handed it to RabbitMQ (set on the work message; the log's copy has none).
    dispatched_at: float | None = None
    # What its webhook announces (schemas.api.WEBHOOK_EVENTS); None: the terminal statuses.
    webhook_events: list[str] | None = None
    # A line of an OpenAI-style batch (streams/batches.py): the batch's id and the line's 0-based index
    # in its input file. Charged with the batch (tables.quota.decide_batch), never one by one.
    batch_id: str | None = None
    batch_line: int | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.asdict())

    @classmethod
    def from_bytes(cls, data: bytes) -> InferenceRequest:
        return cls.from_data(orjson.loads(data))


class ResultEvent(
    faust.Record,
    namespace="inferstream.ResultEvent",
    serializer="json",
    include_metadata=False,
):
    """A status change of one request, written to the results topic.

    It repeats the request's descriptive fields so any consumer (the PostgreSQL
    sink, the quota settler) can act on it alone, in any order.
    """

    request_id: str
    user_id: str
    status: Status
    at: float
    task: str = ""  # a Task value; empty on an event that does not know it
    model: str = ""
    priority: Priority = Priority.NORMAL
    estimated_tokens: int = 0
    created_at: float = 0.0
    quota_day: str = ""
    attempts: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    callback_url: str | None = None
    history: list[dict[str, Any]] | None = None
    # When the model work began; terminal events carry it because a fast request
    # never publishes a separate `running` event (workers: ml_running_after_ms).
    started_at: float | None = None
    # When it was handed to RabbitMQ: a request that moved on quickly never had a `dispatched` event.
    dispatched_at: float | None = None
    # The backend of its route that served it (routes file `backends[].name`); on a failure, the last one tried.
    backend: str | None = None
    webhook_events: list[str] | None = None  # the request's, repeated like callback_url
    batch_id: str | None = None  # the request's, repeated: settlement counts the batch's progress by it
    batch_line: int | None = None  # the request's, repeated: the line whose progress bit it sets

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.asdict())

    @classmethod
    def from_bytes(cls, data: bytes) -> ResultEvent:
        return cls.from_data(orjson.loads(data))

    @classmethod
    def for_request(cls, req: InferenceRequest, status: str, at: float, **extra: Any) -> ResultEvent:
        return cls(
            request_id=req.request_id,
            user_id=req.user_id,
            status=status,
            at=at,
            task=req.task,
            model=req.model,
            priority=req.priority,
            estimated_tokens=req.estimated_tokens,
            created_at=req.created_at,
            quota_day=req.quota_day,
            callback_url=req.callback_url,
            webhook_events=req.webhook_events,
            dispatched_at=req.dispatched_at,
            batch_id=req.batch_id,
            batch_line=req.batch_line,
            **extra,
        )
