"""Agent: terminal results -> the quota table (reservation becomes usage, or is refunded).

The results topic is keyed by ``user_id`` with the quota changelog's partition
count, so this agent runs on the worker that owns the user's quota state.
"""

from __future__ import annotations

import faust

from schemas.records import ResultEvent
from streams.gateway import metrics
from streams.topics import Topics
from tables.quota import QuotaBook


def used_tokens(event: ResultEvent) -> int:
    usage = event.usage or {}
    try:
        return int(usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def register_settle(app: faust.App, topics: Topics, book: QuotaBook) -> None:
    @app.agent(topics.results, name="settle-quota", concurrency=1)
    async def settle_quota(stream: faust.StreamT[ResultEvent]) -> None:
        async for event in stream:
            if event.is_terminal and book.settle(
                event.user_id, event.request_id, event.status, used_tokens(event)
            ):
                metrics.SETTLED.labels(event.status).inc()
