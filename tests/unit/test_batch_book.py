"""The ``batches`` table's rules without services: progress counted once, state transitions, documents."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from inferstream.errors import InvalidRequest
from inferstream.ids import batch_line_id, is_file_id, new_batch_id
from schemas.batch_docs import batch_list, batch_object, output_file_id, public, render_files
from schemas.records import ResultEvent
from streams.batches import parse_create
from tables.batches import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchBook,
    all_terminal,
    apply_results,
    batch_created_s,
    batch_key,
    final_status,
    new_entry,
    popcount,
    request_counts,
)

NOW = 1_750_000_000.0


def entry(lines: int = 10, batch_id: str | None = None, user: str = "u/1") -> dict[str, Any]:
    return new_entry(
        batch_id=batch_id or new_batch_id(NOW), user_id=user, input_file_id="file-" + "0" * 24,
        endpoint="/v1/embeddings", metadata={"k": "v"}, lines=lines, estimated=lines * 3,
        quota_day="2025-06-15", priority="low", created_at=NOW,
    )  # fmt: skip


def event(e: dict[str, Any], line: int, status: str, offset: int) -> Any:
    value = ResultEvent(
        request_id=batch_line_id(e["batch_id"], line), user_id=e["user_id"], status=status, at=NOW,
        batch_id=e["batch_id"], batch_line=line,
    )  # fmt: skip
    return SimpleNamespace(value=value, message=SimpleNamespace(offset=offset))


def book_with(e: dict[str, Any]) -> BatchBook:
    book = BatchBook({}, now=lambda: NOW + 5)
    book.create(e)
    book.started(e["user_id"], e["batch_id"])
    book.lines_written(e["user_id"], e["batch_id"], e["lines"])
    return book


def test_first_terminal_status_of_a_line_counts_once() -> None:
    e = entry(4)
    new = apply_results(
        e, [(0, "completed", 10), (1, "failed", 11), (0, "failed", 12), (2, "expired", 13)]
    )
    assert new is not None
    assert new["counts"] == {"completed": 1, "failed": 1, "expired": 1, "cancelled": 0}
    assert new["settled_upto"] == 13 and popcount(new["done"]) == 3
    assert request_counts(new) == {"total": 4, "completed": 1, "failed": 2}


def test_replayed_offsets_change_nothing() -> None:
    e = apply_results(entry(4), [(0, "completed", 10), (1, "completed", 11)])
    assert e is not None
    assert apply_results(e, [(0, "completed", 10), (1, "failed", 11)]) is None
    # A duplicate at a new offset (a redelivered result) moves the offset, not the counts.
    again = apply_results(e, [(1, "failed", 20)])
    assert again is not None and again["counts"] == e["counts"] and again["settled_upto"] == 20


def test_lines_outside_the_batch_are_ignored() -> None:
    new = apply_results(entry(2), [(-1, "completed", 1), (2, "completed", 2)])
    assert new is not None and popcount(new["done"]) == 0 and new["settled_upto"] == 2


def test_bitmap_of_50000_lines_stays_small() -> None:
    e = entry(50_000)
    new = apply_results(e, ((i, "completed", i) for i in range(50_000)))
    assert new is not None and popcount(new["done"]) == 50_000
    assert len(orjson.dumps(new)) < 9_000


def test_on_terminal_counts_each_line_once_under_replay() -> None:
    e = entry(3)
    book = book_with(e)
    user, bid = e["user_id"], e["batch_id"]
    events = [event(e, 0, "completed", 5), event(e, 1, "failed", 6), event(e, 0, "completed", 7)]
    asyncio.run(book.on_terminal(events))
    asyncio.run(book.on_terminal(events))  # the settle agent replays its batch after a crash
    got = book.get(user, bid)
    assert got is not None and got["counts"]["completed"] == 1 and got["counts"]["failed"] == 1
    assert not all_terminal(got)
    asyncio.run(book.on_terminal([event(e, 2, "cancelled", 8)]))
    got = book.get(user, bid)
    assert got is not None and all_terminal(got)


def test_results_of_other_batches_and_plain_requests_are_skipped() -> None:
    e = entry(2)
    book = book_with(e)
    other = entry(2)  # not in this worker's table
    plain = SimpleNamespace(
        value=ResultEvent(request_id="req_x", user_id="u/1", status="completed", at=NOW),
        message=SimpleNamespace(offset=1),
    )
    asyncio.run(book.on_terminal([event(other, 0, "completed", 1), plain]))
    got = book.get(e["user_id"], e["batch_id"])
    assert got is not None and got["settled_upto"] == -1


def test_transitions_and_timestamps() -> None:
    e = entry(2)
    book = BatchBook({}, now=lambda: NOW + 1)
    user, bid = e["user_id"], e["batch_id"]
    book.create(e)
    assert book.get(user, bid)["status"] == VALIDATING  # type: ignore[index]
    started = book.started(user, bid)
    assert (
        started is not None
        and started["status"] == IN_PROGRESS
        and started["in_progress_at"] == NOW + 1
    )
    book.lines_written(user, bid, 1)
    book.lines_written(user, bid, 0)  # never goes back
    assert book.get(user, bid)["written"] == 1  # type: ignore[index]
    book.lines_written(user, bid, 99)
    assert book.get(user, bid)["written"] == 2  # type: ignore[index]
    assert not book.is_cancelled(user, bid)
    cancelling = book.cancel(user, bid)
    assert (
        cancelling is not None
        and cancelling["status"] == CANCELLING
        and cancelling["cancelling_at"] == NOW + 1
    )
    assert book.is_cancelled(user, bid)
    fin = book.finalizing(user, bid)
    assert fin is not None and fin["status"] == FINALIZING
    done = book.finalized(user, bid, final_status(fin), "file-a", None)
    assert done is not None and done["status"] == CANCELLED and done["cancelled_at"] == NOW + 1
    # A final batch is not cancelled again (the view answers 409).
    assert book.cancel(user, bid)["status"] == CANCELLED  # type: ignore[index]
    book.drop(user, bid)
    assert book.get(user, bid) is None and batch_key(bid, user) not in book.table


def test_final_status() -> None:
    e = entry(2)
    assert final_status(e) == COMPLETED
    assert final_status({**e, "counts": {**e["counts"], "expired": 1}}) == EXPIRED
    assert (
        final_status({**e, "cancel_requested": True, "counts": {**e["counts"], "expired": 1}})
        == CANCELLED
    )


def test_owned_open_filters_by_owner_and_finality() -> None:
    a, b = entry(1, user="a"), entry(1, user="b")
    book = BatchBook({})
    book.create(a)
    book.create(b)
    assert [x["user_id"] for x in book.owned_open(lambda u: u == "a")] == ["a"]
    book.finalized("a", a["batch_id"], COMPLETED, None, None)
    assert list(book.owned_open(lambda u: u == "a")) == []
    assert len(list(book.owned_open(lambda u: u == "a", include_final=True))) == 1


def test_batch_object_is_openai_shaped() -> None:
    e = entry(3)
    e = {**e, "status": IN_PROGRESS, "in_progress_at": NOW + 0.7}
    doc = batch_object(e)
    assert doc["user_id"] == "u/1"
    shown = public(doc)
    assert "user_id" not in shown
    assert shown["object"] == "batch" and shown["id"] == e["batch_id"]
    assert shown["created_at"] == int(NOW) and shown["in_progress_at"] == int(NOW)
    assert shown["expires_at"] == int(NOW) + 86_400 and shown["completed_at"] is None
    assert shown["request_counts"] == {"total": 3, "completed": 0, "failed": 0}
    assert shown["completion_window"] == "24h" and shown["metadata"] == {"k": "v"}
    listing = batch_list([doc], has_more=True)
    assert listing["first_id"] == listing["last_id"] == e["batch_id"] and listing["has_more"]
    assert "user_id" not in listing["data"][0]


def test_output_file_ids_are_deterministic_file_ids() -> None:
    bid = new_batch_id(NOW)
    assert (
        output_file_id(bid, "output")
        == output_file_id(bid, "output")
        != output_file_id(bid, "error")
    )
    assert is_file_id(output_file_id(bid, "output"))
    assert batch_created_s(bid) == pytest.approx(NOW, abs=0.001)


def _row(line: int, status: str, **kw: Any) -> dict[str, Any]:
    return {
        "request_id": f"req_{line}",
        "batch_line": line,
        "status": status,
        "model": "m",
        "created_at": NOW,
        **kw,
    }


def test_render_files_per_endpoint() -> None:
    rows = [
        _row(1, "failed", error={"type": "model_error", "message": "boom"}),
        _row(
            0,
            "completed",
            result={"embeddings": [[0.5, 1.0]]},
            usage={"prompt_tokens": 3, "total_tokens": 3},
        ),
        _row(2, "cancelled"),
    ]
    out, err, n_out, n_err = render_files("/v1/embeddings", ["a", "b", "c"], rows)
    assert (n_out, n_err) == (1, 2)
    first = orjson.loads(out.splitlines()[0])
    assert first["id"] == "batch_req_req_0" and first["custom_id"] == "a" and first["error"] is None
    body = first["response"]["body"]
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"] == "req_0"
    assert body["object"] == "list" and body["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, 1.0]}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    errors = [orjson.loads(x) for x in err.splitlines()]
    assert [x["custom_id"] for x in errors] == ["b", "c"]
    assert (
        errors[0]["error"] == {"code": "model_error", "message": "boom"}
        and errors[0]["response"] is None
    )
    assert errors[1]["error"]["code"] == "cancelled"

    gen = [
        _row(
            0,
            "completed",
            result={"text": "hi"},
            usage={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        )
    ]
    chat = orjson.loads(render_files("/v1/chat/completions", ["x"], gen)[0])["response"]["body"]
    assert chat["id"] == "chatcmpl-req_0" and chat["object"] == "chat.completion"
    assert chat["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ]
    assert chat["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    comp = orjson.loads(render_files("/v1/completions", ["x"], gen)[0])["response"]["body"]
    assert comp["id"] == "cmpl-req_0" and comp["object"] == "text_completion"
    assert comp["choices"][0]["text"] == "hi" and comp["choices"][0]["logprobs"] is None
    # The same rows render the same bytes (a finalization done again writes the same file).
    assert render_files("/v1/completions", ["x"], gen) == render_files(
        "/v1/completions", ["x"], list(gen)
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h", "extra": 1}',
        b'{"input_file_id": "f", "endpoint": "/v1/other", "completion_window": "24h"}',
        b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "1h"}',
        b'{"input_file_id": "f", "endpoint": "/v1/embeddings"}',
        b"not json",
        b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": {"k": 1}}',
        b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "24h", "metadata": {"'
        + b"k" * 65
        + b'": "v"}}',
    ],
)
def test_create_body_refusals(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        parse_create(body)


def test_create_body_metadata_limits() -> None:
    many = {f"k{i}": "v" for i in range(17)}
    body = orjson.dumps(
        {
            "input_file_id": "f",
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
            "metadata": many,
        }
    )
    with pytest.raises(InvalidRequest):
        parse_create(body)
    ok = {f"k{i}": "v" * 512 for i in range(16)}
    req = parse_create(
        orjson.dumps(
            {
                "input_file_id": "f",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": ok,
            }
        )
    )
    assert req.metadata == ok


def test_line_request_is_deterministic_and_carries_the_batch() -> None:
    from schemas.batch_lines import BatchLine
    from streams.batch_runner import line_request

    e = {**entry(3), "status": IN_PROGRESS}
    line = BatchLine(
        line=2, custom_id="c", task="embed", model="m", input=["t"], input_is_list=False, params=None,
        estimated_tokens=4,
    )  # fmt: skip
    req = line_request(e, line)
    assert req.request_id == batch_line_id(e["batch_id"], 2) == line_request(e, line).request_id
    assert (req.batch_id, req.batch_line, req.user_id) == (e["batch_id"], 2, "u/1")
    assert (
        req.created_at == NOW and req.deadline_at == NOW + 86_400 and req.quota_day == "2025-06-15"
    )
    assert req.priority == "low" and req.estimated_tokens == 4


def test_batch_priority_is_capped_by_plan_and_routes() -> None:
    from schemas.batch_lines import BatchLine
    from schemas.plans import Plan
    from streams.batches import BatchService

    class Route:
        def __init__(self, cap: str) -> None:
            self.cap = cap

        def cap_priority(self, priority: str) -> str:
            order = ["low", "normal", "high"]
            return order[min(order.index(priority), order.index(self.cap))]

    routes = SimpleNamespace(route=lambda task, model: Route("normal") if model == "m" else None)
    service = BatchService.__new__(BatchService)
    service.routes = routes  # type: ignore[assignment]
    line = BatchLine(0, "c", "embed", "m", ["t"], False, None, 1)
    high = Plan("p", 10, 10, 10, max_priority="high", batch_priority="high")
    assert service._priority(high, [line]) == "normal"
    capped = Plan("p", 10, 10, 10, max_priority="low", batch_priority="high")
    assert service._priority(capped, [line]) == "low"
    assert service._priority(Plan("p", 10, 10, 10), [line]) == "low"


def test_last_line_answered_wakes_the_runner() -> None:
    e = entry(2)
    book = book_with(e)
    woken: list[int] = []
    book.on_all_terminal = lambda: woken.append(1)
    asyncio.run(book.on_terminal([event(e, 0, "completed", 1)]))
    assert woken == []
    asyncio.run(book.on_terminal([event(e, 1, "completed", 2)]))
    assert woken == [1]
