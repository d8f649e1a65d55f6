"""The records that travel through the log and RabbitMQ: the pipeline's contracts.

Both are keyed by ``user_id`` in the log, so the requests topic, the results
topic and the quota table's changelog are co-partitioned. New fields must have
defaults: a record already in the log must still decode after a change.
"""

from __future__ import annotations

from typing import Any, Literal

import faust
import orjson

Status = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled", "expired"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})
STATUS_RANK: dict[str, int] = {
    "queued": 1,
    "dispatched": 2,
    "running": 3,
    "completed": 4,
    "failed": 4,
    "cancelled": 4,
    "expired": 4,
}
PRIORITY_LEVEL: dict[str, int] = {"low": 0, "normal": 1, "high": 2}


class InferenceRequest(
    faust.Record,
    namespace="inferstream.InferenceRequest",
    serializer="json",
    include_metadata=False,
):
    """An admitted request, as written to the requests topic and the work queue."""

    request_id: str
    user_id: str
    task: str
    model: str
    input: list[str]
    estimated_tokens: int
    created_at: float
    quota_day: str
    priority: str = "normal"
    params: dict[str, Any] | None = None
    deadline_at: float | None = None
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None
    input_is_list: bool = False

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
    status: str
    at: float
    task: str = ""
    model: str = ""
    priority: str = "normal"
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
            **extra,
        )
