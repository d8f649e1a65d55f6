"""The SSE stream over real HTTP and a real Redis: order, resume and replay, heartbeats, polling fallback, 1,000 clients."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridges.clients.notifications import NotificationHub
from bridges.clients.redis import RedisClient
from devtools.localbroker import free_port as closed_port
from inferstream.settings import Settings
from streams.gateway.sse import stream_events
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
REDIS_URL = "redis://127.0.0.1:6379/0"
Store = dict[str, dict[str, Any]]
Serve = Callable[..., Awaitable[str]]


@dataclass
class Event:
    kind: str  # "event" or "comment"
    id: int = 0
    event: str = ""
    data: Any = None


def doc(request_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "status": status, "task": "embed", "model": "m", **extra}


async def read_stream(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    fields: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if fields:
                yield Event(
                    "event", int(fields["id"]), fields["event"], orjson.loads(fields["data"])
                )
                fields = {}
        elif line.startswith(":"):
            yield Event("comment", data=line[1:].strip())
        else:
            key, _, value = line.partition(": ")
            fields[key] = value


async def events_until_end(resp: aiohttp.ClientResponse, timeout_s: float = 10.0) -> list[Event]:
    async with asyncio.timeout(timeout_s):
        return [e async for e in read_stream(resp) if e.kind == "event"]


@pytest.fixture
def settings(redis_settings: Settings) -> Settings:
    return redis_settings


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[NotificationHub]:
    h = NotificationHub(settings)
    assert await h.wait_healthy(5.0)
    yield h
    await h.stop()


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[RedisClient]:
    c = RedisClient(settings)  # another "worker": not the hub's connection
    yield c
    await c.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(
        hub: NotificationHub, store: Store, *, heartbeat_s: float = 15.0, poll_s: float = 1.0
    ) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            request_id = request.match_info["rid"]

            async def load() -> dict[str, Any] | None:
                return store.get(request_id)

            return await stream_events(
                request,
                request_id=request_id,
                load_doc=load,
                hub=hub,
                heartbeat_s=heartbeat_s,
                poll_s=poll_s,
            )

        app = web.Application()
        app.router.add_get("/events/{rid}", handler)
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def advance(store: Store, publisher: RedisClient, *docs: dict[str, Any]) -> None:
    for d in docs:
        store[d["request_id"]] = d
    await publisher.cache_and_publish([("u", d) for d in docs])


async def test_events_in_order_with_ids_and_end_after_terminal(
    serve: Serve, hub: NotificationHub, publisher: RedisClient
) -> None:
    store: Store = {"req_1": doc("req_1", "queued")}
    base = await serve(hub, store)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        stream = read_stream(resp)
        first = await anext(stream)
        assert (first.id, first.event, first.data) == (1, "queued", doc("req_1", "queued"))
        later = [doc("req_1", s) for s in ("dispatched", "running")]
        later.append(doc("req_1", "completed", result={"text": "done"}))
        await advance(store, publisher, *later)
        async with asyncio.timeout(10):
            rest = [e async for e in stream if e.kind == "event"]
    assert [(e.id, e.event) for e in rest] == [(2, "dispatched"), (3, "running"), (4, "completed")]
    assert rest[-1].data == later[-1]
    await wait_for(lambda: hub.listeners == 0, timeout=5, what="no listeners")


async def test_resume_with_last_event_id(
    serve: Serve, hub: NotificationHub, publisher: RedisClient
) -> None:
    store: Store = {"req_2": doc("req_2", "running")}
    base = await serve(hub, store)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/events/req_2", headers={"Last-Event-ID": "2"}) as resp:
            stream = read_stream(resp)
            first = await anext(stream)
            assert (first.id, first.event) == (3, "running")
            # A stale, repeated notification must not produce an id the client already has.
            await advance(store, publisher, doc("req_2", "dispatched"), doc("req_2", "running"))
            await advance(
                store, publisher, doc("req_2", "failed", error={"type": "x", "message": "y"})
            )
            async with asyncio.timeout(10):
                rest = [e async for e in stream if e.kind == "event"]
            assert [(e.id, e.event) for e in rest] == [(4, "failed")]
        # Reconnecting after the terminal event: nothing new, the stream just ends.
        async with http.get(f"{base}/events/req_2", headers={"Last-Event-ID": "4"}) as resp:
            assert await events_until_end(resp) == []
        # A fresh client gets the terminal state alone, collapsed, and the end.
        async with http.get(f"{base}/events/req_2") as resp:
            assert [(e.id, e.event) for e in await events_until_end(resp)] == [(4, "failed")]


async def test_resume_replays_missed_events_from_history_then_goes_live(
    serve: Serve, hub: NotificationHub, publisher: RedisClient
) -> None:
    lifecycle = [
        doc("req_8", s, updated_at=f"t{i}")
        for i, s in enumerate(("queued", "dispatched", "running"))
    ]
    store: Store = {}
    await advance(store, publisher, *lifecycle)
    base = await serve(hub, store)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/events/req_8", headers={"Last-Event-ID": "1"}) as resp:
            stream = read_stream(resp)
            replayed = [await anext(stream), await anext(stream)]
            assert [(e.id, e.event, e.data) for e in replayed] == [
                (2, "dispatched", lifecycle[1]),
                (3, "running", lifecycle[2]),
            ]
            # Live from here; a repeated `running` (replay and live overlapping) is not sent again.
            done = doc("req_8", "completed", result={"text": "ok"})
            await advance(store, publisher, lifecycle[2], done)
            rest = await events_until_end(resp)
        assert [(e.id, e.event, e.data) for e in rest] == [(4, "completed", done)]
        # After the end, a resume from the first id is pure replay, the same documents in order.
        async with http.get(f"{base}/events/req_8", headers={"Last-Event-ID": "1"}) as resp:
            again = await events_until_end(resp)
        assert [(e.id, e.data) for e in again] == [(2, lifecycle[1]), (3, lifecycle[2]), (4, done)]
        # Fast work never had `running`: a resume from `dispatched` replays only what there was.
        quick = [doc("req_9", "queued"), doc("req_9", "dispatched"), doc("req_9", "completed")]
        await advance(store, publisher, *quick)
        async with http.get(f"{base}/events/req_9", headers={"Last-Event-ID": "1"}) as resp:
            assert [(e.id, e.data) for e in await events_until_end(resp)] == [
                (2, quick[1]),
                (4, quick[2]),
            ]


async def test_resume_the_history_cannot_serve_gets_one_marked_snapshot(
    serve: Serve, hub: NotificationHub, publisher: RedisClient, settings: Settings
) -> None:
    running = doc("req_10", "running")
    store: Store = {"req_10": running}  # known to the store only: no history in Redis
    base = await serve(hub, store)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/events/req_10", headers={"Last-Event-ID": "1"}) as resp:
            stream = read_stream(resp)
            first = await anext(stream)
            assert (first.id, first.event, first.data) == (
                3,
                "running",
                {**running, "replayed": "snapshot"},
            )
            done = doc("req_10", "completed")
            await advance(store, publisher, done)
            assert [(e.id, e.data) for e in await events_until_end(resp)] == [
                (4, done)
            ]  # live again
        # Ids no state has: the current state, marked; a recorded history does not change that.
        for bad in ("5", "-1", "soon"):
            async with http.get(f"{base}/events/req_10", headers={"Last-Event-ID": bad}) as resp:
                got = await events_until_end(resp)
            assert [(e.id, e.data) for e in got] == [(4, {**done, "replayed": "snapshot"})], bad
    # Redis down: the store still answers, the history does not.
    dead = NotificationHub(
        Settings(namespace=settings.namespace, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    )
    try:
        base = await serve(dead, store, poll_s=0.05)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base}/events/req_10", headers={"Last-Event-ID": "2"}) as resp,
        ):
            got = await events_until_end(resp)
        assert [(e.id, e.data) for e in got] == [(4, {**done, "replayed": "snapshot"})]
    finally:
        await dead.stop()


async def test_a_stream_that_falls_behind_replays_instead_of_skipping(
    serve: Serve, settings: Settings, publisher: RedisClient
) -> None:
    # A one-slot queue overflows at once: the stream reloads and must fill the gap from history.
    hub = NotificationHub(settings, queue_size=1)
    try:
        assert await hub.wait_healthy(5.0)
        store: Store = {"req_11": doc("req_11", "queued")}
        base = await serve(hub, store)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_11") as resp:
            stream = read_stream(resp)
            assert (await anext(stream)).event == "queued"
            burst = [doc("req_11", "dispatched"), *[doc("req_11", "running")] * 30]
            await advance(store, publisher, *burst, doc("req_11", "completed"))
            rest = await events_until_end(resp)
        assert [(e.id, e.event) for e in rest] == [
            (2, "dispatched"),
            (3, "running"),
            (4, "completed"),
        ]
        assert all("replayed" not in e.data for e in rest)
    finally:
        await hub.stop()


async def test_heartbeat_comment(
    serve: Serve, hub: NotificationHub, publisher: RedisClient
) -> None:
    store: Store = {"req_3": doc("req_3", "queued")}
    base = await serve(hub, store, heartbeat_s=0.05)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_3") as resp:
        stream = read_stream(resp)
        assert (await anext(stream)).event == "queued"
        async with asyncio.timeout(5):
            comment = await anext(stream)
        assert (comment.kind, comment.data) == ("comment", "keep-alive")
        await advance(store, publisher, doc("req_3", "cancelled"))
        async with asyncio.timeout(10):
            rest = [e for e in [e async for e in stream] if e.kind == "event"]
        assert [e.event for e in rest] == ["cancelled"]


async def test_falls_back_to_polling_when_redis_is_down(serve: Serve, settings: Settings) -> None:
    dead = Settings(namespace=settings.namespace, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    hub = NotificationHub(dead)
    try:
        store: Store = {"req_4": doc("req_4", "queued")}
        base = await serve(hub, store, poll_s=0.05)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_4") as resp:
            stream = read_stream(resp)
            assert (await anext(stream)).event == "queued"
            assert not hub.healthy
            store["req_4"] = doc("req_4", "running")  # only the store changes: nobody publishes
            async with asyncio.timeout(5):
                assert (await anext(stream)).event == "running"
            store["req_4"] = doc("req_4", "completed")
            async with asyncio.timeout(10):
                rest = [e async for e in stream if e.kind == "event"]
            assert [(e.id, e.event) for e in rest] == [(4, "completed")]
    finally:
        await hub.stop()


class TcpProxy:
    """A TCP relay to Redis that the test can cut and restore, to lose Redis mid-stream."""

    def __init__(self, target_port: int = 6379) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_redis_lost_mid_stream_then_back(
    serve: Serve, settings: Settings, publisher: RedisClient
) -> None:
    proxy = TcpProxy()
    await proxy.start()
    via_proxy = Settings(
        namespace=settings.namespace, redis_url=f"redis://127.0.0.1:{proxy.port}/0"
    )
    hub = NotificationHub(via_proxy, backoff_max_s=0.2)
    try:
        assert await hub.wait_healthy(5.0)
        store: Store = {"req_5": doc("req_5", "queued"), "req_6": doc("req_6", "queued")}
        base = await serve(hub, store, poll_s=0.05)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_5") as resp:
            stream = read_stream(resp)
            assert (await anext(stream)).event == "queued"
            await proxy.cut()
            await wait_for(
                lambda: not hub.healthy, timeout=5, what="the hub to notice Redis is gone"
            )
            store["req_5"] = doc("req_5", "completed")  # published while the hub is deaf
            async with asyncio.timeout(10):
                rest = [e async for e in stream if e.kind == "event"]
            assert [e.event for e in rest] == ["completed"]
        await proxy.start()  # same port: the hub reconnects and pushes again
        assert await hub.wait_healthy(5.0)
        async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_6") as resp:
            stream = read_stream(resp)
            assert (await anext(stream)).event == "queued"
            await advance(store, publisher, doc("req_6", "completed"))
            assert [e.event for e in await events_until_end(resp)] == ["completed"]
    finally:
        await hub.stop()
        await proxy.cut()


async def test_client_disconnect_cleans_up_quietly(
    serve: Serve, hub: NotificationHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    store: Store = {"req_7": doc("req_7", "queued")}
    base = await serve(hub, store, heartbeat_s=0.05)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/events/req_7") as resp:
        assert (await anext(read_stream(resp))).event == "queued"
        assert hub.listeners == 1
    await wait_for(lambda: hub.listeners == 0, timeout=5, what="no listeners")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_one_server_holds_1000_streams(
    serve: Serve, hub: NotificationHub, publisher: RedisClient
) -> None:
    n = 1000
    ids = [f"req_{i:05d}" for i in range(n)]
    store: Store = {rid: doc(rid, "queued") for rid in ids}
    base = await serve(hub, store)
    connected = 0
    all_connected = asyncio.Event()
    received: dict[str, list[str]] = {}

    async def client(http: aiohttp.ClientSession, rid: str) -> None:
        nonlocal connected
        async with http.get(f"{base}/events/{rid}") as resp:
            stream = read_stream(resp)
            first = await anext(stream)
            connected += 1
            if connected == n:
                all_connected.set()
            received[rid] = [first.event] + [e.event async for e in stream if e.kind == "event"]

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as http:
        tasks = [asyncio.create_task(client(http, rid)) for rid in ids]
        async with asyncio.timeout(30):
            await all_connected.wait()
        opened = time.perf_counter()
        assert hub.listeners == n
        await advance(store, publisher, *(doc(rid, "completed") for rid in ids))
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        done = time.perf_counter()
    assert all(received[rid] == ["queued", "completed"] for rid in ids)
    await wait_for(lambda: hub.listeners == 0, timeout=5, what="no listeners")
    print(
        f"\n{n} SSE streams: opened in {opened - started:.2f}s, all terminal events received {done - opened:.2f}s after publish"
    )
    assert done - started < 30
