"""RabbitClient and ResultsBridge against the real RabbitMQ: topology, confirmed publishes, priorities, bridge acks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from bridges.clients.rabbitmq import (
    PERSISTENT,
    Outgoing,
    Properties,
    PublishError,
    RabbitClient,
    UnknownRoute,
    publish_batch,
)
from bridges.results_bridge import ResultsBridge
from devtools.localbroker import free_port
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


def make_req(priority: str = "normal", task: str = "generate", model: str = "sim-gpt", **extra: Any) -> InferenceRequest:
    return InferenceRequest(
        request_id=uuid.uuid4().hex, user_id=f"u-{uuid.uuid4().hex[:6]}", task=task, model=model,
        input=["hello"], estimated_tokens=5, created_at=time.time(), quota_day="2030-01-01",
        priority=priority, **extra,
    )


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    yield Settings(namespace=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def rabbit(settings: Settings) -> AsyncIterator[RabbitClient]:
    client = RabbitClient(settings)
    yield client
    await client.delete_namespace()
    await client.close()


async def test_topology_is_idempotent_and_priorities_order_a_backlog(rabbit: RabbitClient, settings: Settings) -> None:
    await rabbit.connect()
    other = RabbitClient(settings)  # declaring the same topology again must not fail
    await other.connect()
    await other.close()
    reqs = [make_req(p) for p in ("low", "normal", "high", "low", "high", "normal")]
    await rabbit.publish_requests(reqs)
    queue = rabbit.work_queue_name("generate", "sim-gpt")
    assert queue == f"{settings.namespace}.work.generate.sim-gpt"
    assert await rabbit.message_count(queue) == 6
    got = []
    while (msg := await rabbit.get(queue)) is not None:
        got.append(msg)
    assert [InferenceRequest.from_bytes(m.body).priority for m in got] == ["high", "high", "normal", "normal", "low", "low"]
    first = got[0]
    assert first.message_id == reqs[2].request_id and first.priority == 2
    assert first.headers["user_id"] == reqs[2].user_id and first.headers["task"] == "generate"
    assert first.delivery_mode == 2  # persistent


async def test_unknown_route_and_unreachable_broker(rabbit: RabbitClient, settings: Settings) -> None:
    with pytest.raises(UnknownRoute):
        await rabbit.publish_requests([make_req(model="no-such-model")])
    port = free_port()  # nothing listens there
    down = RabbitClient(Settings(namespace=settings.namespace, rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{port}/"))
    with pytest.raises(PublishError) as info:
        await down.publish_requests([make_req()])
    assert len(info.value.request_ids) == 1


def _outgoing(exchange: str, key: str, n: int) -> list[Outgoing]:
    return [
        Outgoing(exchange, key, b"x" * i, Properties(delivery_mode=PERSISTENT, message_id=f"m{i}"))
        for i in range(n)
    ]


async def test_one_write_batch_keeps_aiormqs_confirm_bookkeeping(rabbit: RabbitClient) -> None:
    """publish_batch registers its messages in aiormq's own confirm state: an unroutable one is
    returned (and only it fails), aio-pika's own publishes on the same channel stay in step, and
    nothing is left behind in the channel's bookkeeping."""
    channel = await rabbit.connect()
    raw = await channel.get_underlay_channel()
    queue = rabbit.results_queue_name
    good = _outgoing("", queue, 5)
    lost = Outgoing(rabbit.work_exchange_name, "no.such-route", b"{}", Properties(message_id="lost"))
    outcomes = await publish_batch(channel, [*good[:2], lost, *good[2:]], timeout=10)
    assert outcomes[:2] == [None, None] and outcomes[3:] == [None, None, None]
    assert isinstance(outcomes[2], aio_pika.exceptions.PublishError)
    # aio-pika's per-message path on the same channel right after: its delivery tags follow ours.
    await channel.default_exchange.publish(aio_pika.Message(b"after", message_id="after"), routing_key=queue)
    assert await publish_batch(channel, _outgoing("", queue, 3), timeout=10) == [None] * 3
    assert await publish_batch(channel, [], timeout=10) == []
    # A body larger than a frame is split into body frames.
    big = Outgoing("", queue, b"y" * (raw.max_content_size * 2 + 7), Properties(message_id="big"))
    assert await publish_batch(channel, [big], timeout=10) == [None]
    bodies = []
    while (msg := await rabbit.get(queue)) is not None:
        bodies.append(msg.body)
    assert bodies == [*(b"x" * i for i in range(5)), b"after", b"", b"x", b"xx", big.body]
    assert not raw.confirmations and not raw.message_id_delivery_tag


async def test_a_batch_whose_channel_is_closed_fails_whole_and_the_channel_comes_back(
    rabbit: RabbitClient,
) -> None:
    """The broker closes the channel (a publish to a missing exchange): every message of the
    batch gets the channel's error (nothing waits for its timeout), and publish_requests
    succeeds again once the robust channel has reopened."""
    channel = await rabbit.connect()
    missing = [Outgoing("no-such-exchange", "k", b"x", Properties(message_id=f"m{i}")) for i in range(3)]
    started = time.monotonic()
    outcomes = await publish_batch(channel, missing, timeout=10)
    assert all(isinstance(o, aio_pika.exceptions.ChannelNotFoundEntity) for o in outcomes)
    assert time.monotonic() - started < 5

    async def published() -> bool:
        try:
            await rabbit.publish_requests([make_req()])
        except PublishError:
            return False
        return True

    await wait_for(published, timeout=10, what="a publish after the channel reopened")


async def test_results_and_dead_letters(rabbit: RabbitClient) -> None:
    req = make_req(task="embed", model="all-MiniLM-L6-v2")
    await rabbit.publish_result(ResultEvent.for_request(req, "running", at=1.0))
    msg = await rabbit.get(rabbit.results_queue_name)
    assert msg is not None and ResultEvent.from_bytes(msg.body).status == "running"
    assert msg.headers["user_id"] == req.user_id
    history = [{"attempt": 1, "type": "model_http_503", "message": "busy"}]
    await rabbit.publish_dead_letter(req, history, {"type": "model_http_503", "message": "busy"})
    dead = await rabbit.get(rabbit.dead_letter_queue_name)
    assert dead is not None
    info = RabbitClient.dead_letter_info(dead)
    assert info["request"]["request_id"] == req.request_id
    assert info["history"] == history and info["error"]["type"] == "model_http_503" and info["attempts"] == 1


async def test_results_bridge_moves_batches_and_never_acks_a_failed_produce(
    rabbit: RabbitClient, settings: Settings
) -> None:
    got: list[tuple[bytes, bytes]] = []
    failing = {"on": True, "calls": 0}

    async def produce(records: list[tuple[bytes, bytes]]) -> None:
        failing["calls"] += 1
        if failing["on"]:
            raise ConnectionError("log unavailable")
        got.extend(records)

    events = [ResultEvent.for_request(make_req(), "completed", at=float(i)) for i in range(50)]
    bridge = ResultsBridge(settings, rabbit, produce, retry_base_s=0.01, retry_max_s=0.05)
    await bridge.start()
    try:
        for e in events:
            await rabbit.publish_result(e)
        # retried, and nothing acked meanwhile
        await wait_for(lambda: failing["calls"] >= 3, timeout=10, what="three failed produces")
        assert got == []
        # all held unacked by the bridge
        await wait_for(lambda: _count_is(rabbit, rabbit.results_queue_name, 0), timeout=10, what="an empty results queue")
    finally:
        await bridge.stop()
    # Unacked messages went back to the queue when the bridge's channel closed.
    await wait_for(lambda: _count_is(rabbit, rabbit.results_queue_name, 50), timeout=10, what="50 messages in the results queue")

    failing["on"] = False
    bridge = ResultsBridge(settings, rabbit, produce)
    await bridge.start()
    try:
        await wait_for(lambda: len(got) >= 50, timeout=10, what="50 results produced")
    finally:
        await bridge.stop()
    assert sorted(v for _, v in got) == sorted(e.to_bytes() for e in events)  # bodies untouched
    assert {k for k, _ in got} == {e.user_id.encode() for e in events}
    assert dict(got)[events[0].user_id.encode()] == events[0].to_bytes()
    await wait_for(lambda: _count_is(rabbit, rabbit.results_queue_name, 0), timeout=10, what="an empty results queue")
    assert bridge.moved == 50


async def _count_is(rabbit: RabbitClient, queue: str, n: int) -> bool:
    return await rabbit.message_count(queue) == n



async def test_a_batch_of_results_is_one_message_and_the_bridge_makes_one_record_per_event(
    rabbit: RabbitClient, settings: Settings
) -> None:
    got: list[tuple[bytes, bytes]] = []

    async def produce(records: list[tuple[bytes, bytes]]) -> None:
        got.extend(records)

    reqs = [make_req() for _ in range(5)]
    batch = [ResultEvent.for_request(r, "completed", at=float(i)) for i, r in enumerate(reqs)]
    single = ResultEvent.for_request(make_req(), "failed", at=9.0)  # an older worker's format
    await rabbit.publish_results(batch)
    await rabbit.publish_results([single])
    assert await rabbit.message_count(rabbit.results_queue_name) == 2
    bridge = ResultsBridge(settings, rabbit, produce)
    await bridge.start()
    try:
        await wait_for(lambda: len(got) >= 6, timeout=10, what="6 results produced")
    finally:
        await bridge.stop()
    assert got == [(e.user_id.encode(), e.to_bytes()) for e in [*batch, single]]
    await wait_for(lambda: _count_is(rabbit, rabbit.results_queue_name, 0), timeout=10, what="an empty results queue")
    assert bridge.moved == 6
