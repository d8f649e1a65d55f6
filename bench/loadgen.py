"""A lean HTTP/1.1 load generator for submissions: keep-alive connections, one request in flight each.

aiohttp's client costs ~0.3-0.4 ms of CPU per request here, which at thousands
of requests per second takes most of a core from the system under test on a
2-core machine. This client writes prebuilt request bytes on a raw asyncio
transport and parses only the status line, ``Content-Length`` and the 202's
``request_id``, at a fraction of that. It counts exactly (``total``
submissions, or for ``seconds``), and keeps per request what the benchmarks
need: status, latency, when the answer arrived and the request id.

The server must answer with ``Content-Length`` (the gateway's JSON answers do)
and keep the connection open; a connection that closes is reopened and its
request is counted as status 0.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

_HEAD_END = b"\r\n\r\n"


@dataclass
class Outcome:
    """Every answer of a run, in the order they arrived."""

    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(
        default_factory=list
    )  # seconds, write of the request -> answer parsed
    done_at: list[float] = field(default_factory=list)  # time.perf_counter() of each answer
    accepted: list[str] = field(default_factory=list)  # request ids of the 202s, in arrival order
    began: float = 0.0
    ended: float = 0.0

    @property
    def counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.statuses).items()))

    def accepted_latencies(self) -> list[float]:
        return sorted(lat for s, lat in zip(self.statuses, self.latencies, strict=True) if s == 202)

    def accepted_times(self) -> list[float]:
        """When each 202 arrived, in arrival order."""
        return [t for s, t in zip(self.statuses, self.done_at, strict=True) if s == 202]

    def accepted_in_order(self) -> list[float]:
        """The latency of each 202, in arrival order."""
        return [lat for s, lat in zip(self.statuses, self.latencies, strict=True) if s == 202]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; :meth:`send` writes a request and awaits its (status, body)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(_HEAD_END)
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(
                    ValueError(f"answer without Content-Length: {head[:200]!r}")
                )
            return
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return
        status = int(head[9:12])
        body = bytes(self.buffer[head_end + 4 : end])
        del self.buffer[:end]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def post_requests(url: str, keys: list[str], body: bytes) -> list[bytes]:
    """``POST /v1/requests`` with ``body``, one prebuilt request per key, for a gateway at ``url``."""
    netloc = urlsplit(url).netloc
    return [
        (
            f"POST /v1/requests HTTP/1.1\r\nHost: {netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for key in keys
    ]


async def submit(
    urls: list[str],
    keys: list[str],
    body: bytes,
    concurrency: int,
    *,
    total: int | None = None,
    seconds: float | None = None,
    out: Outcome | None = None,
) -> Outcome:
    """Submit ``total`` requests (or for ``seconds``), round-robin over keys and gateways.

    ``concurrency`` connections each keep one request in flight, spread evenly
    over ``urls``. Answers are recorded in ``out`` (a new :class:`Outcome` by
    default) as they arrive, so a caller can watch the run's progress.
    """
    if (total is None) == (seconds is None):
        raise ValueError("give exactly one of total and seconds")
    loop = asyncio.get_running_loop()
    prebuilt = {url: post_requests(url, keys, body) for url in urls}
    order = itertools.cycle(range(len(keys)))
    budget = iter(range(total)) if total is not None else itertools.count()
    out = Outcome() if out is None else out
    clock = time.perf_counter

    async def lane(url: str) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        requests = prebuilt[url]
        _, conn = await loop.create_connection(_Connection, host, port)
        stop = out.began + seconds if seconds is not None else float("inf")
        try:
            for _ in budget:
                started = clock()
                if started >= stop:
                    break
                try:
                    status, answer = await conn.send(requests[next(order)])
                except ConnectionError:
                    status, answer = 0, b""
                    _, conn = await loop.create_connection(_Connection, host, port)
                now = clock()
                out.statuses.append(status)
                out.latencies.append(now - started)
                out.done_at.append(now)
                if status == 202:
                    out.accepted.append(orjson.loads(answer)["request_id"])
        finally:
            if conn.transport is not None:
                conn.transport.close()

    out.began = clock()
    await asyncio.gather(*(lane(urls[i % len(urls)]) for i in range(concurrency)))
    out.ended = clock()
    return out
