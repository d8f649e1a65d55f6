"""Agents: requests and results topics -> PostgreSQL rows, then the Redis cache, notifications, webhooks.

Each batch is upserted in one round trip (idempotent, rank-guarded) and the
sink retries while PostgreSQL is down; Faust acks the batch's offsets only
after the write returns, so nothing is lost and memory stays bounded.
"""

from __future__ import annotations

import faust

from bridges.sink import ResultSink
from inferstream.settings import Settings
from streams.agents.guard import until_done
from streams.topics import Topics


def register_sinks(app: faust.App, settings: Settings, topics: Topics, sink: ResultSink) -> None:
    within = settings.sink_batch_wait_ms / 1000

    @app.agent(topics.requests, name="sink-requests", concurrency=1)
    async def sink_requests(stream: faust.StreamT) -> None:
        async for batch in stream.take(settings.sink_batch_size, within=within):
            await until_done("sink-requests", lambda: sink.write(batch))  # noqa: B023 - awaited at once

    @app.agent(topics.results, name="sink-results", concurrency=1)
    async def sink_results(stream: faust.StreamT) -> None:
        async for batch in stream.take(settings.sink_batch_size, within=within):
            await until_done("sink-results", lambda: sink.write(batch))  # noqa: B023 - awaited at once
