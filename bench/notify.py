"""Notification latency: from ``publish_docs`` in one process to the SSE event received by a client.

One server process (an aiohttp app serving ``stream_events`` with a ``NotificationHub``, reading
the current state from the Redis cache) and this process, which opens ``--concurrency`` SSE
streams at a time, waits until every one has its ``queued`` event, then publishes the terminal
documents through its own :class:`RedisClient` (as another worker's sink would) and times each
``completed`` event's arrival. Two passes over ``--requests`` ids: one publish every
``--interval-ms`` (the latency of a lone result), then each group of streams in one
``publish_docs`` call (a sink batch: the last of the burst waits for the ones before it).
Both processes and Redis share the machine's cores.

    .venv/bin/python -m bench.notify [--requests 500] [--concurrency 100] [--interval-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web

from bridges.clients.notifications import NotificationHub
from bridges.clients.redis import RedisClient
from inferstream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _doc(request_id: str, status: str) -> dict[str, Any]:
    now = "2026-01-01T00:00:00.000Z"
    return {
        "request_id": request_id,
        "status": status,
        "task": "generate",
        "model": "sim-gpt",
        "priority": "normal",
        "created_at": now,
        "updated_at": now,
        "estimated_tokens": 40,
        "attempts": 1,
    }


async def serve(settings: Settings, port: int) -> None:
    """The server process: one hub, one cache client, SSE for every request id."""
    from streams.gateway.sse import stream_events

    hub = NotificationHub(settings)
    cache = RedisClient(settings)

    async def events(request: web.Request) -> web.StreamResponse:
        request_id = request.match_info["rid"]

        async def load() -> dict[str, Any] | None:
            found = await cache.get_doc(request_id)
            return None if found is None else found[1]

        return await stream_events(
            request,
            request_id=request_id,
            load_doc=load,
            hub=hub,
            heartbeat_s=settings.sse_heartbeat_s,
            poll_s=settings.sse_poll_s,
        )

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=200 if hub.healthy else 503)

    app = web.Application()
    app.router.add_get("/events/{rid}", events)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await hub.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await hub.stop()
    await cache.close()


class _Round:
    """``concurrency`` streams held open; their terminal docs published paced or in one burst."""

    def __init__(self, base: str, ids: list[str]) -> None:
        self.base = base
        self.ids = ids
        self.connected = 0
        self.all_connected = asyncio.Event()
        self.published_at: dict[str, float] = {}
        self.received_at: dict[str, float] = {}

    async def listen(self, http: aiohttp.ClientSession, request_id: str) -> None:
        async with http.get(f"{self.base}/events/{request_id}") as resp:
            event = ""
            async for raw in resp.content:
                line = raw.rstrip(b"\n")
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: ") and event == "queued":
                    self.connected += 1
                    if self.connected == len(self.ids):
                        self.all_connected.set()
                elif line.startswith(b"data: ") and event == "completed":
                    self.received_at[request_id] = time.perf_counter()
                    assert orjson.loads(line[6:])["request_id"] == request_id
                    return
        raise RuntimeError(f"stream of {request_id} ended without its terminal event")

    async def run(
        self, http: aiohttp.ClientSession, publisher: RedisClient, interval_s: float | None
    ) -> list[float]:
        listeners = [asyncio.create_task(self.listen(http, rid)) for rid in self.ids]
        async with asyncio.timeout(30):
            await self.all_connected.wait()
        if interval_s is None:  # burst: the whole batch in one publish_docs, as a sink batch would
            now = time.perf_counter()
            self.published_at = dict.fromkeys(self.ids, now)
            await publisher.publish_docs([("bench", _doc(rid, "completed")) for rid in self.ids])
        else:
            for rid in self.ids:
                self.published_at[rid] = time.perf_counter()
                await publisher.publish_docs([("bench", _doc(rid, "completed"))])
                await asyncio.sleep(interval_s)
        async with asyncio.timeout(30):
            await asyncio.gather(*listeners)
        return [self.received_at[rid] - self.published_at[rid] for rid in self.ids]


def _summary(label: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))]
    return (
        f"{label}: {len(ms)} requests, p50 {statistics.median(ms):.2f} ms, "
        f"p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
    )


async def run(args: argparse.Namespace) -> None:
    settings = Settings(namespace=f"bench{uuid.uuid4().hex[:8]}", redis_url=args.redis_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    ids = [f"req_{i:012x}{uuid.uuid4().hex[:12]}" for i in range(args.requests)]
    publisher = RedisClient(settings)
    await publisher.cache_docs([("bench", _doc(rid, "queued")) for rid in ids])
    server = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.notify", "--serve", settings.namespace),
        *("--port", str(port), "--redis-url", args.redis_url),
        cwd=ROOT,
    )
    paced: list[float] = []
    burst: list[float] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await _wait_ready(http, base)
            chunks = [ids[k : k + args.concurrency] for k in range(0, len(ids), args.concurrency)]
            for chunk in chunks:
                paced += await _Round(base, chunk).run(http, publisher, args.interval_ms / 1000)
            for chunk in chunks:
                await publisher.cache_docs([("bench", _doc(rid, "queued")) for rid in chunk])
                burst += await _Round(base, chunk).run(http, publisher, None)
    finally:
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
        await publisher.close()
        raw = aioredis.Redis.from_url(args.redis_url)
        await raw.delete(*(publisher.doc_key(rid) for rid in ids))
        await raw.aclose()
    print(f"notification latency, publish_docs -> SSE event, {args.concurrency} streams open:")
    print(_summary(f"  one publish every {args.interval_ms:g} ms", paced))
    print(_summary(f"  bursts of {args.concurrency} docs per publish_docs", burst))


async def _wait_ready(http: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError("bench server did not become ready")
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--interval-ms", type=float, default=5.0, help="pause between paced publishes"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--serve", metavar="NAMESPACE", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        settings = Settings(namespace=args.serve, redis_url=args.redis_url)
        asyncio.run(serve(settings, args.port))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
