"""The watchdog re-dispatches a stalled row as the request it was written from, batch line included."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.records import ResultEvent
from streams.agents.watchdog import request_of_row

CREATED = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


def row(**extra: object) -> dict[str, object]:
    return {
        "request_id": "req_0001", "user_id": "u", "task": "embed", "model": "m", "input": ["a"],
        "estimated_tokens": 3, "created_at": CREATED, "quota_day": "2025-06-15", "priority": "low",
        **extra,
    }  # fmt: skip


def test_a_batch_line_keeps_its_batch_and_line_so_its_result_counts_for_the_batch() -> None:
    req = request_of_row(row(batch_id="batch_x", batch_line=0))
    assert (req.batch_id, req.batch_line) == ("batch_x", 0)
    result = ResultEvent.for_request(req, "completed", at=1.0)
    assert (result.batch_id, result.batch_line) == ("batch_x", 0)


def test_a_plain_request_has_no_batch() -> None:
    req = request_of_row(row())
    assert (req.batch_id, req.batch_line, req.created_at) == (None, None, CREATED.timestamp())
