"""Agent: terminal results -> the quota table (reservation becomes usage, or is refunded).

The results topic is keyed by ``user_id`` with the quota changelog's partition
count, so this agent runs on the worker that owns the user's quota state. Each
result carries its offset into the settlement, so a batch replayed after a crash
is recognised and not applied twice (:meth:`tables.quota_book.QuotaBook.settle_results`).

The agent reads ahead (:func:`streams.agents.readahead.read_ahead`): the next batch gathers
while one waits for its settlements' acks, and offsets are acked only after the batch settled
and ``on_terminal`` returned, in log order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import faust
from faust.types import EventT

from inferstream import tracing
from inferstream.settings import Settings
from schemas.records import ResultEvent
from streams.agents import metrics
from streams.agents.dispatched import DispatchedEvents
from streams.agents.readahead import read_ahead
from streams.topics import Topics
from tables.quota import Settlement
from tables.quota_book import QuotaBook


def used_tokens(event: ResultEvent) -> int:
    usage = event.usage or {}
    try:
        return int(usage.get("total_tokens") or 0)
    except (TypeError, ValueError):
        return 0


def settlements(events: Sequence[EventT]) -> list[Settlement]:
    """The terminal results of a batch, in log order, with their offsets."""
    found: list[Settlement] = []
    for event in events:
        value = event.value
        if isinstance(value, ResultEvent) and value.is_terminal:
            found.append(
                (
                    value.user_id,
                    value.request_id,
                    value.status,
                    used_tokens(value),
                    event.message.offset,
                )
            )
    return found


def settle_spans(events: Sequence[EventT]) -> list[tracing.Span]:
    """A ``settle quota`` span per terminal result, under the context its record's header names."""
    return [
        tracing.start(
            "settle quota",
            tracing.header_context(e.headers),
            kind=tracing.SpanKind.CONSUMER,
            attributes={
                "inferstream.request_id": e.value.request_id,
                "inferstream.status": str(e.value.status),
            },
        )
        for e in events
        if isinstance(e.value, ResultEvent) and e.value.is_terminal
    ]


OnTerminal = Callable[[Sequence[EventT]], Awaitable[None]]


def register_settle(
    app: faust.App,
    settings: Settings,
    topics: Topics,
    book: QuotaBook,
    dispatched: DispatchedEvents,
    on_terminal: OnTerminal | None = None,
) -> None:
    """``on_terminal(events)``: called with each batch of events read (in log order, with offsets) after
    the quota settled them and before their offsets are acked (batch progress, :mod:`tables.batches`);
    it must be idempotent under a replay of the same offsets."""

    async def settle(events: Sequence[EventT]) -> None:
        dispatched.moved_on(cast(ResultEvent, e.value) for e in events)
        await settle_quota_of(events)
        if on_terminal is not None:
            await on_terminal(events)

    async def settle_quota_of(events: Sequence[EventT]) -> None:
        results = settlements(events)
        if results:
            spans = settle_spans(events) if tracing.ENABLED else []
            # Returns once the broker holds the settlements: the batch's offsets are
            # acked after this body, so a crash can replay them (recognised) but never lose one.
            try:
                settled = await book.settle_results(results)
            except BaseException as exc:
                tracing.end_all(spans, exc)
                raise
            tracing.end_all(spans)
            for _, _, status, _, _ in settled:
                metrics.SETTLED.labels(status).inc()

    @app.agent(topics.results, name="settle-quota", concurrency=1)
    async def settle_quota(stream: faust.StreamT[ResultEvent]) -> None:
        await read_ahead(
            stream,
            "settle-quota",
            settle,
            settings.sink_batch_size,
            settings.sink_batch_wait_ms / 1000,
        )
