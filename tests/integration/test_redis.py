"""The Redis bridge against a real Redis: cache with owner and TTL, cancellations, cross-process notifications, Redis down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridges.clients.notifications import NotificationHub, Subscription
from bridges.clients.redis import CacheUnavailable, RedisClient
from devtools.localbroker import free_port as closed_port
from inferstream.settings import Settings

pytestmark = pytest.mark.integration
REDIS_URL = "redis://127.0.0.1:6379/0"


def doc(request_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "status": status, "task": "embed", "model": "m", **extra}


@pytest.fixture
def settings(redis_settings: Settings) -> Settings:
    return redis_settings


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[RedisClient]:
    c = RedisClient(settings)
    yield c
    await c.close()


async def test_cache_roundtrip_with_owner_and_ttl(client: RedisClient, settings: Settings) -> None:
    a, b = doc("req_a", "completed", result={"text": "hi"}), doc("req_b", "queued")
    await client.cache_docs([("alice", a), ("bob", b)])
    assert await client.get_doc("req_a") == ("alice", a)
    assert await client.get_doc("req_b") == ("bob", b)
    assert await client.get_doc("req_missing") is None
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        ttl = await raw.ttl(client.doc_key("req_a"))
    finally:
        await raw.aclose()
    assert 0 < ttl <= settings.result_ttl_s


async def test_cache_never_goes_back_to_an_earlier_status(client: RedisClient) -> None:
    done = doc("req_c", "completed")
    await client.cache_docs([("u", done)])
    await client.cache_docs([("u", doc("req_c", "running"))])  # a late, out-of-order event
    assert await client.get_doc("req_c") == ("u", done)
    later = doc("req_c", "completed", attempts=2)  # same rank: the newer write wins
    await client.cache_and_publish([("u", later)])
    assert await client.get_doc("req_c") == ("u", later)


async def test_cancellation_registry(client: RedisClient) -> None:
    assert await client.cancelled([]) == set()
    await client.mark_cancelled("req_x")
    assert await client.cancelled(["req_x", "req_y", "req_z"]) == {"req_x"}


async def test_closed_port_fails_fast_with_cache_unavailable(settings: Settings) -> None:
    dead = RedisClient(
        Settings(namespace=settings.namespace, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    )
    try:
        for call in (
            lambda: dead.get_doc("req_a"),
            lambda: dead.cache_docs([("u", doc("req_a", "queued"))]),
            lambda: dead.publish_docs([("u", doc("req_a", "queued"))]),
            lambda: dead.cancelled(["req_a"]),
            lambda: dead.mark_cancelled("req_a"),
            dead.ping,
        ):
            started = time.perf_counter()
            with pytest.raises(CacheUnavailable):
                await call()
            assert time.perf_counter() - started < 1.0
    finally:
        await dead.close()


async def test_silent_server_times_out_fast(settings: Settings) -> None:
    """A peer that accepts the connection and never answers (a hung Redis) costs about op_timeout_s."""
    held: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = RedisClient(
        Settings(namespace=settings.namespace, redis_url=f"redis://127.0.0.1:{port}/0")
    )
    try:
        started = time.perf_counter()
        with pytest.raises(CacheUnavailable):
            await hung.get_doc("req_a")
        assert time.perf_counter() - started < 1.0
    finally:
        await hung.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_hub_delivers_what_another_client_publishes(settings: Settings) -> None:
    hub = NotificationHub(settings)
    other_worker = RedisClient(settings)  # its own connections, as in another process
    try:
        assert await hub.wait_healthy(5.0)
        sub_a1, sub_a2, sub_b = (
            hub.subscribe("req_a"),
            hub.subscribe("req_a"),
            hub.subscribe("req_b"),
        )
        states = ["dispatched", "running", "completed"]
        await other_worker.publish_docs(
            [("u", doc("req_a", s)) for s in states] + [("v", doc("req_b", "failed"))]
        )
        for sub in (sub_a1, sub_a2):
            got = [await asyncio.wait_for(sub.get(), 5.0) for _ in states]
            assert [d["status"] for d in got if d is not None] == states
        assert await asyncio.wait_for(sub_b.get(), 5.0) == doc("req_b", "failed")
        for sub in (sub_a1, sub_a2, sub_b):
            hub.unsubscribe(sub)
        assert hub.listeners == 0
    finally:
        await other_worker.close()
        await hub.stop()


async def test_slow_listener_gets_a_reload_marker_not_unbounded_memory() -> None:
    sub = Subscription("req_s", maxsize=4)
    for i in range(10):
        sub.offer(doc("req_s", "running", attempts=i))
    sub.offer(doc("req_s", "completed"))
    items = []
    while sub.qsize():
        items.append(await sub.get())
    assert len(items) <= 4
    assert items[0] is None  # overflowed: told to reload instead of buffering everything
    assert items[-1] == doc("req_s", "completed")
