"""Agent: terminal results -> the quota table (reservation becomes usage, or is refunded).

The results topic is keyed by ``user_id`` with the quota changelog's partition
count, so this agent runs on the worker that owns the user's quota state.
"""

from __future__ import annotations

import asyncio

import faust

from inferstream.settings import Settings
from schemas.records import ResultEvent
from streams.agents import metrics
from streams.topics import Topics
from tables.quota import QuotaBook


def used_tokens(event: ResultEvent) -> int:
    usage = event.usage or {}
    try:
        return int(usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def register_settle(app: faust.App, settings: Settings, topics: Topics, book: QuotaBook) -> None:
    @app.agent(topics.results, name="settle-quota", concurrency=1)
    async def settle_quota(stream: faust.StreamT[ResultEvent]) -> None:
        async for batch in stream.take(settings.sink_batch_size, within=settings.sink_batch_wait_ms / 1000):
            touched: set[str] = set()
            for event in batch:
                if event.is_terminal and book.settle(
                    event.user_id, event.request_id, event.status, used_tokens(event)
                ):
                    touched.add(event.user_id)
                    metrics.SETTLED.labels(event.status).inc()
            # The batch's offsets are acked when this body returns: only once the
            # broker holds the settlements, so a crash can replay them (idempotent)
            # but never lose one.
            await asyncio.gather(*(book.written(user) for user in touched))
