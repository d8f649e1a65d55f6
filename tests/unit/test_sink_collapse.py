"""Collapsing a batch of events to one row per request, and the statuses the batch passed through."""

from __future__ import annotations

from typing import Any

from bridges.clients.store.rows import collapse, merge, passed_through, row_of
from schemas.documents import doc_at, earlier_doc, request_doc, step_of
from schemas.records import InferenceRequest, ResultEvent

T0 = 1_800_000_000.0


def request(request_id: str = "req_a", **extra: Any) -> InferenceRequest:
    fields: dict[str, Any] = {
        "request_id": request_id,
        "user_id": "alice",
        "task": "generate",
        "model": "sim-gpt",
        "input": ["hello"],
        "estimated_tokens": 260,
        "created_at": T0,
        "quota_day": "2027-01-15",
        "priority": "high",
        "params": {"max_tokens": 256},
        "metadata": {"ticket": 7},
        "callback_url": None,
    }
    fields.update(extra)
    return InferenceRequest(**fields)


def event(req: InferenceRequest, status: str, dt: float, **extra: Any) -> ResultEvent:
    return ResultEvent.for_request(req, status, T0 + dt, **extra)


def test_request_alone_is_a_queued_row() -> None:
    (row,) = collapse([request()])
    assert row["status"] == "queued" and row["status_rank"] == 1
    assert row["input"] == ["hello"] and row["metadata"] == {"ticket": 7}
    assert row["updated_at"] == T0 and row["history"] == [{"status": "queued", "at": T0}]
    assert "callback_url" not in row and "webhook_state" not in row  # None values are left out


def test_whole_lifecycle_in_one_batch_keeps_every_field() -> None:
    req = request()
    done = event(req, "completed", 3, result={"text": "hi"}, usage={"total_tokens": 9}, attempts=1)
    (row,) = collapse([req, event(req, "dispatched", 1), event(req, "running", 2), done])
    assert row["status"] == "completed"
    assert row["input"] == ["hello"] and row["params"] == {"max_tokens": 256}
    assert (row["dispatched_at"], row["started_at"], row["completed_at"]) == (
        T0 + 1,
        T0 + 2,
        T0 + 3,
    )
    assert row["updated_at"] == T0 + 3 and row["attempts"] == 1
    assert row["result"] == {"text": "hi"} and row["usage"] == {"total_tokens": 9}
    assert [h["status"] for h in row["history"]] == ["queued", "dispatched", "running", "completed"]


def test_order_within_the_batch_does_not_matter() -> None:
    req = request()
    items = [req, event(req, "dispatched", 1), event(req, "completed", 3, result={"text": "x"})]
    assert collapse(items) == collapse(list(reversed(items)))


def test_duplicates_collapse_to_one_row() -> None:
    req = request()
    done = event(req, "completed", 3, result={"text": "x"})
    assert collapse([req, req, done, done]) == collapse([req, done])


def test_first_terminal_wins_a_tie() -> None:
    req = request()
    done = event(req, "completed", 3, result={"text": "x"})
    failed = event(req, "failed", 4, error={"type": "model_error", "message": "boom"})
    (row,) = collapse([done, failed])
    assert row["status"] == "completed" and "error" not in row
    assert [h["status"] for h in row["history"]] == ["completed"]


def test_result_event_defaults_are_not_values() -> None:
    bare = ResultEvent(request_id="req_a", user_id="alice", status="running", at=T0)
    row = row_of(bare)
    assert row is not None
    assert row["task"] is None and row["created_at"] is None and row["estimated_tokens"] is None
    merged = merge(row, row_of(request()) or {})
    assert (
        merged["status"] == "running"
        and merged["task"] == "generate"
        and merged["created_at"] == T0
    )


def test_webhook_pending_only_for_terminal_rows_with_a_callback() -> None:
    with_cb = request("req_b", callback_url="https://example.test/hook")
    rows = collapse(
        [with_cb, event(with_cb, "completed", 1), request("req_c", callback_url="https://x.test")]
    )
    assert [(r["request_id"], r.get("webhook_state")) for r in rows] == [
        ("req_b", "pending"),
        ("req_c", None),
    ]


def test_unknown_status_is_ignored_and_rows_sorted_by_id() -> None:
    weird = ResultEvent(request_id="req_z", user_id="alice", status="exploded", at=T0)
    rows = collapse([request("req_b"), weird, request("req_a")])
    assert [r["request_id"] for r in rows] == ["req_a", "req_b"]


def test_a_collapsed_row_reports_each_status_its_events_carried_in_order() -> None:
    req = request()
    done = event(req, "completed", 3, result={"text": "hi"}, started_at=T0 + 2)
    items = [done, event(req, "dispatched", 1), req, event(req, "dispatched", 1.5)]
    (row,) = collapse(items)
    passed_through(items, [row])
    # First event of each rank wins; `running` is only implied by started_at: no event, no entry.
    assert row["passed"] == [{"status": "queued", "at": T0}, {"status": "dispatched", "at": T0 + 1}]
    assert [h["status"] for h in row["history"]] == ["queued", "dispatched", "running", "completed"]


def test_rows_at_their_only_status_and_rows_not_returned_get_no_passed() -> None:
    a, b = request("req_a"), request("req_b")
    items = [a, b, event(b, "dispatched", 1)]
    rows = [r for r in collapse(items) if r["request_id"] == "req_a"]  # req_b did not advance
    passed_through(items, rows)
    assert "passed" not in rows[0]


def test_an_earlier_doc_has_no_outcome_and_its_own_time() -> None:
    req = request()
    (row,) = collapse(
        [
            req,
            event(
                req, "completed", 3, result={"text": "hi"}, usage={"total_tokens": 4}, attempts=2
            ),
        ]
    )
    then = earlier_doc(row, "dispatched", T0 + 1)
    final = request_doc(row)
    assert then["status"] == "dispatched" and then["attempts"] == 0
    assert (
        then["updated_at"] == "2027-01-15T08:00:01.000Z"
        and final["updated_at"] == "2027-01-15T08:00:03.000Z"
    )
    assert not {"result", "usage", "error", "completed_at"} & then.keys()
    assert {k: v for k, v in final.items() if k not in then} == {
        "result": {"text": "hi"},
        "usage": {"total_tokens": 4},
        "completed_at": final["completed_at"],
    }


def test_work_that_began_implies_dispatched_when_the_batch_lacks_it() -> None:
    req = request()
    # Under load the worker's `running` can reach the log before the forward agent's `dispatched`.
    running = event(req, "running", 2)
    (row,) = collapse([running])
    row["prev_rank"] = 1
    passed_through([running], [row])
    assert row["passed"] == [{"status": "dispatched", "at": T0 + 2}]
    # Fast work: a terminal event with started_at implies it too; the row's own dispatched_at wins.
    done = event(req, "completed", 3, started_at=T0 + 2.5)
    (row,) = collapse([done])
    row.update(prev_rank=1, dispatched_at=T0 + 1)
    passed_through([done], [row])
    assert row["passed"] == [{"status": "dispatched", "at": T0 + 1}]


def test_nothing_is_implied_or_repeated_below_what_the_row_already_had() -> None:
    req = request()
    unroutable = event(req, "failed", 1, error={"type": "unroutable", "message": "no queue"})
    (row,) = collapse([unroutable])
    row["prev_rank"] = 1
    passed_through([unroutable], [row])
    assert "passed" not in row  # no work began: it was never dispatched
    stale = [event(req, "dispatched", 1), event(req, "completed", 3, started_at=T0 + 2)]
    (row,) = collapse(stale)
    row["prev_rank"] = 3  # the row was already running: dispatched was announced back then
    passed_through(stale, [row])
    assert "passed" not in row


def test_a_few_bytes_of_step_rebuild_an_earlier_doc_from_the_final_one() -> None:
    req = request()
    completed = event(req, "completed", 3, result={"text": "hi"}, attempts=1, backend="gpu-a")
    (row,) = collapse([req, completed])
    final, then = request_doc(row), earlier_doc(row, "running", T0 + 2)
    assert step_of(then) == {"status": "running", "updated_at": then["updated_at"], "attempts": 0}
    assert doc_at(final, step_of(then)) == then  # what the Redis history stores and replays
    # Which backend served it is an outcome: a live `running` event never showed it, nor may its replay.
    assert final["backend"] == "gpu-a" and "backend" not in then


def test_a_terminal_event_carries_the_hand_off_of_a_request_that_had_no_dispatched_event() -> None:
    # Fast work: the forward agent wrote no `dispatched` event; the work message said when it was handed off.
    handed_off = request().derive(dispatched_at=T0 + 0.5)
    (row,) = collapse([request(), event(handed_off, "completed", 2, started_at=T0 + 1)])
    assert row["dispatched_at"] == T0 + 0.5 and row["started_at"] == T0 + 1
    assert [h["status"] for h in row["history"]] == ["queued", "dispatched", "running", "completed"]
    # A late `dispatched` event of the same request adds nothing.
    (again,) = collapse([request(), event(handed_off, "completed", 2), event(handed_off, "dispatched", 0.5)])
    assert [h["status"] for h in again["history"]] == ["queued", "dispatched", "completed"]
