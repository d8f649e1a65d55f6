"""The results bridge's records: one per event, for batch messages and single-event ones alike."""

from __future__ import annotations

from typing import Any

import orjson

from bridges.clients.rabbitmq import RESULTS_BATCH_TYPE, result_bodies, result_count
from bridges.results_bridge import message_key, message_records


class Message:
    def __init__(
        self,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, Any] | None = None,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.message_id = "m1"


def body(request_id: str, user_id: str) -> bytes:
    return orjson.dumps(
        {"request_id": request_id, "user_id": user_id, "status": "completed", "at": 1.0}
    )


def test_a_batch_message_is_split_into_one_record_per_event_keyed_by_user() -> None:
    events = [body("r1", "alice"), body("r2", "bob"), body("r3", "alice")]
    message = Message(
        b"\n".join(events),
        RESULTS_BATCH_TYPE,
        {"events": 3, "user_ids": ["alice", "bob", b"alice"]},
    )
    assert message_records(message) == [
        (b"alice", events[0]),
        (b"bob", events[1]),
        (b"alice", events[2]),
    ]  # type: ignore[arg-type]
    assert result_count(message) == 3 and result_bodies(message) == events  # type: ignore[arg-type]


def test_a_batch_without_usable_user_ids_is_keyed_by_each_body() -> None:
    events = [body("r1", "alice"), body("r2", "bob")]
    for headers in (None, {"user_ids": ["only-one"]}, {"user_ids": "alice"}):
        message = Message(b"\n".join(events), RESULTS_BATCH_TYPE, headers)
        assert message_records(message) == [(b"alice", events[0]), (b"bob", events[1])]  # type: ignore[arg-type]
        assert result_count(message) == 2  # type: ignore[arg-type]


def test_single_event_messages_keep_working() -> None:
    one = body("r1", "alice")
    with_header = Message(one, headers={"user_id": "carol"})
    assert message_records(with_header) == [(b"carol", one)]  # type: ignore[arg-type]
    assert message_key(with_header) == b"carol"  # type: ignore[arg-type]
    without = Message(one)
    assert message_records(without) == [(b"alice", one)]  # type: ignore[arg-type]
    assert message_records(Message(b"not json")) == [(b"", b"not json")]  # type: ignore[arg-type]
    assert result_count(without) == 1  # type: ignore[arg-type]
