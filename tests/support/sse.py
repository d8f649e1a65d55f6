"""A test client of the event stream (``GET /v1/requests/{id}/events``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


async def frames(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """The events of a ``text/event-stream`` body: their fields as sent (``id`` a string), ``data`` decoded."""
    current: dict[str, Any] = {}
    async for raw in content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            current[name] = value
            continue
        if current:
            current["data"] = orjson.loads(current["data"])
            yield current
            current = {}


@dataclass
class Sse:
    status: int
    events: list[dict[str, Any]] = field(default_factory=list)


async def read_sse(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    timeout: float = 45,
    opened: asyncio.Event | None = None,
) -> Sse:
    """Events of a stream until it ends (or ``stop_after`` events, then disconnect).

    ``opened`` is set once the first event has arrived: the server is subscribed by then, so
    whatever happens to the request afterwards must reach this stream.
    """
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        out = Sse(r.status)
        if r.status != 200:
            return out
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for event in frames(r.content):
            event["id"] = int(event["id"])
            out.events.append(event)
            if opened is not None:
                opened.set()
            if stop_after is not None and len(out.events) >= stop_after:
                break
        return out
