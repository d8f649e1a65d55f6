"""The SSE emitter: ids increase, nothing is sent twice, gaps are replayed or marked as a snapshot."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridges.clients.redis import CacheUnavailable
from streams.gateway.sse import KEEP_ALIVE, SNAPSHOT, _Emitter, format_event, parse_last_event_id


class Wire:
    """What the client receives: the response's writes, parsed back into events."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def events(self) -> list[tuple[int, str, dict[str, Any]]]:
        out = []
        for chunk in self.chunks:
            if chunk == KEEP_ALIVE:
                continue
            fields = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
            out.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
        return out


def doc(status: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": "req_1", "status": status, **extra}


def history(*statuses: str) -> Any:
    async def load() -> list[dict[str, Any]]:
        return [doc(s) for s in statuses]

    return load


async def no_history() -> list[dict[str, Any]]:
    raise AssertionError("the history is not needed here")


def emitter(last_id: int = 0) -> tuple[_Emitter, Wire]:
    wire = Wire()
    return _Emitter(wire, last_id), wire  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "rank"),
    [(None, 0), ("", 0), (" 2 ", 2), ("4", 4), ("5", None), ("-1", None), ("abc", None)],
)
def test_last_event_id_is_a_rank_or_unknown(header: str | None, rank: int | None) -> None:
    assert parse_last_event_id(header) == rank


def test_an_event_is_id_status_and_the_document() -> None:
    assert (
        format_event(doc("running"))
        == b'id: 3\nevent: running\ndata: {"request_id":"req_1","status":"running"}\n\n'
    )


async def test_ids_increase_and_no_state_is_sent_twice() -> None:
    em, wire = emitter()
    for status in ("queued", "dispatched", "dispatched", "queued", "running"):
        assert await em.send(doc(status)) is False
    assert await em.send(doc("completed")) is True  # terminal: the stream is over
    assert await em.send(doc("failed")) is True  # another terminal: over, and not sent
    assert [(i, e) for i, e, _ in wire.events()] == [
        (1, "queued"),
        (2, "dispatched"),
        (3, "running"),
        (4, "completed"),
    ]


async def test_an_unknown_status_is_ignored() -> None:
    em, wire = emitter()
    assert await em.send(doc("paused")) is False and wire.chunks == []


async def test_a_new_stream_starts_at_the_current_state() -> None:
    em, wire = emitter()
    assert await em.catch_up(doc("running"), no_history, "req_1") is False
    assert [(i, e, d.get("replayed")) for i, e, d in wire.events()] == [(3, "running", None)]


async def test_no_gap_needs_no_history() -> None:
    em, wire = emitter(last_id=2)
    await em.catch_up(doc("running"), no_history, "req_1")
    await em.catch_up(doc("dispatched"), no_history, "req_1")  # already seen
    assert [i for i, _, _ in wire.events()] == [3]


async def test_a_resume_replays_what_was_missed_in_order_then_the_current_state() -> None:
    em, wire = emitter(last_id=1)
    # The history ends with the current state, as RedisClient.history's does.
    replay = history("queued", "dispatched", "running", "completed")
    assert await em.catch_up(doc("completed"), replay, "req_1") is True
    assert [(i, e, d.get("replayed")) for i, e, d in wire.events()] == [
        (2, "dispatched", None),
        (3, "running", None),
        (4, "completed", None),
    ]


async def test_a_history_short_of_the_current_state_gives_one_marked_snapshot() -> None:
    em, wire = emitter(last_id=1)
    # Cached before the result arrived: it cannot say what came between.
    await em.catch_up(doc("completed"), history("queued", "dispatched", "running"), "req_1")
    assert [(i, e, d.get("replayed")) for i, e, d in wire.events()] == [(4, "completed", SNAPSHOT)]


async def test_no_history_at_all_gives_a_snapshot() -> None:
    async def redis_down() -> list[dict[str, Any]]:
        raise CacheUnavailable("redis down")

    em, wire = emitter(last_id=1)
    await em.catch_up(doc("running"), redis_down, "req_1")
    await em.catch_up(doc("running"), redis_down, "req_1")  # nothing new: nothing sent
    assert [(i, e, d.get("replayed")) for i, e, d in wire.events()] == [(3, "running", SNAPSHOT)]


async def test_an_unknown_last_event_id_counts_nothing_as_seen() -> None:
    em, wire = emitter(last_id=0)
    await em.catch_up(doc("queued"), no_history, "req_1", force=True)
    assert [(i, e, d.get("replayed")) for i, e, d in wire.events()] == [(1, "queued", SNAPSHOT)]
    await em.send(doc("dispatched"))
    assert [i for i, _, _ in wire.events()] == [1, 2]


async def test_keep_alive_is_a_comment_and_counts_as_a_write() -> None:
    em, wire = emitter()
    before = em.written_at
    await em.keep_alive()
    assert wire.chunks == [KEEP_ALIVE] and wire.events() == [] and em.written_at >= before
