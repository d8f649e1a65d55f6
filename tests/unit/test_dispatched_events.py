"""`dispatched` events are written late, and only for requests no later event has been read for."""

from __future__ import annotations

import asyncio
from typing import Any

from schemas.records import InferenceRequest, ResultEvent
from streams.agents.dispatched import DispatchedEvents
from streams.topics import Topics


class Results:
    """The results topic as far as ``send_events`` uses it: what was sent, acked at once."""

    def __init__(self) -> None:
        self.sent: list[ResultEvent] = []

    async def send(self, *, key: str, value: ResultEvent, **_: Any) -> asyncio.Future[None]:
        self.sent.append(value)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def req(i: int) -> InferenceRequest:
    return InferenceRequest(
        request_id=f"req_{i}", user_id="u", task="generate", model="m", input=["x"],
        estimated_tokens=3, created_at=1.0, quota_day="2026-12-01", dispatched_at=5.0,
    )  # fmt: skip


def events(after_ms: int) -> tuple[DispatchedEvents, Results]:
    results = Results()
    return DispatchedEvents(Topics(requests=None, results=results), after_ms), results  # type: ignore[arg-type]


async def test_zero_delay_writes_every_dispatched_event_at_once() -> None:
    dispatched, results = events(0)
    await dispatched.handed_off([req(1), req(2)], at=5.0)
    assert [(e.request_id, e.status, e.at) for e in results.sent] == [("req_1", "dispatched", 5.0), ("req_2", "dispatched", 5.0)]


async def test_only_requests_still_waiting_after_the_delay_get_one() -> None:
    dispatched, results = events(30)
    await dispatched.handed_off([req(1), req(2), req(3)], at=5.0)
    assert results.sent == []  # nothing yet: the delay has not passed
    dispatched.moved_on([ResultEvent.for_request(req(1), "completed", at=5.01)])
    dispatched.moved_on([ResultEvent.for_request(req(2), "dispatched", at=5.0)])  # its own event is no news
    await dispatched.drain()
    assert [e.request_id for e in results.sent] == ["req_2", "req_3"]
    assert all(e.dispatched_at == 5.0 for e in results.sent)
