"""Result events gathered into one message per confirm; lookups gathered the same way."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bridges.clients.rabbitmq import PublishError
from schemas.records import ResultEvent
from workers.gather import Gathered, GatheredLookup
from workers.results import ResultPublisher


def event(i: int) -> ResultEvent:
    return ResultEvent(request_id=f"r{i}", user_id=f"u{i % 3}", status="completed", at=float(i))


class Rabbit:
    def __init__(self) -> None:
        self.messages: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail = False

    async def publish_results(self, events: Sequence[ResultEvent]) -> None:
        self.messages.append([e.request_id for e in events])
        await self.release.wait()
        if self.fail:
            raise PublishError("nacked", request_ids=[e.request_id for e in events])


async def test_events_of_one_tick_leave_as_one_message() -> None:
    rabbit = Rabbit()
    publisher = ResultPublisher(rabbit)
    await asyncio.gather(*(publisher.publish(event(i)) for i in range(5)))
    assert rabbit.messages == [[f"r{i}" for i in range(5)]]


async def test_events_gather_while_a_message_waits_for_its_confirm() -> None:
    rabbit = Rabbit()
    rabbit.release.clear()
    publisher = ResultPublisher(rabbit)
    first = asyncio.ensure_future(publisher.publish(event(0)))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(publisher.publish(event(i))) for i in range(1, 4)]
    for _ in range(3):
        await asyncio.sleep(
            0.005
        )  # separate ticks: still one message, after the first one's confirm
    assert rabbit.messages == [["r0"]] and not first.done()
    rabbit.release.set()
    await asyncio.gather(first, *later)
    assert rabbit.messages == [["r0"], ["r1", "r2", "r3"]]


async def test_a_message_is_capped_and_a_lone_event_waits_for_nothing() -> None:
    rabbit = Rabbit()
    publisher = ResultPublisher(rabbit, max_events=4, max_in_flight=2)
    await asyncio.gather(*(publisher.publish(event(i)) for i in range(10)))
    assert sorted(len(m) for m in rabbit.messages) == [2, 4, 4]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await publisher.publish(event(99))
    assert rabbit.messages[-1] == ["r99"] and loop.time() - started < 0.05


async def test_an_unconfirmed_message_fails_every_event_it_carried() -> None:
    rabbit = Rabbit()
    rabbit.fail = True
    publisher = ResultPublisher(rabbit)
    outcomes = await asyncio.gather(
        *(publisher.publish(event(i)) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, PublishError) for o in outcomes)
    rabbit.fail = False
    await publisher.publish(event(0))  # the retry goes out in a message of its own
    assert rabbit.messages == [["r0", "r1", "r2"], ["r0"]]


async def test_close_cancels_what_waits_for_a_confirm() -> None:
    rabbit = Rabbit()
    rabbit.release.clear()
    publisher = ResultPublisher(rabbit)
    pending = asyncio.ensure_future(publisher.publish(event(0)))
    await asyncio.sleep(0.01)
    await publisher.close()
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_gathered_lookup_answers_each_caller_about_its_own_ids() -> None:
    seen: list[list[str]] = []

    async def cancelled(ids: Sequence[str]) -> set[str]:
        seen.append(list(ids))
        await asyncio.sleep(0.01)
        return {i for i in ids if i.startswith("c")}

    lookup = GatheredLookup(cancelled)
    first = asyncio.ensure_future(lookup(["a1"]))
    await asyncio.sleep(0.001)
    rest = await asyncio.gather(lookup(["c1", "a2"]), lookup(["c2"]))
    assert await first == set() and rest == [{"c1"}, {"c2"}]
    assert seen == [["a1"], ["a2", "c1", "c2"]]


async def test_gathered_hands_a_failure_to_every_caller() -> None:
    async def boom(items: list[int]) -> None:
        raise ValueError("bug")

    gathered: Gathered[int, None] = Gathered(boom, max_items=10)
    outcomes = await asyncio.gather(gathered(1), gathered(2), return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes) and gathered.calls == 1
