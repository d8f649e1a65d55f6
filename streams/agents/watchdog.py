"""Watchdog: a request still ``queued`` long after admission is dispatched again, so none is ever stranded.

Every accepted request is in the log before its 202, and the forward agent
moves it to RabbitMQ within milliseconds. What stands between the two is
Faust's offset bookkeeping, which has known unmerged loss bugs in 0.15.x
(faust-streaming #606: a committed offset jumping past an in-flight event;
#316: bookkeeping advancing after a failed commit; FINDINGS.md): an event
whose offset is committed but that no agent finished is never read again.
The watchdog checks the outcome end to end instead of trusting that
bookkeeping: on the leader, every ``INFERSTREAM_WATCHDOG_INTERVAL_S`` it
asks PostgreSQL for rows still ``queued`` ``INFERSTREAM_WATCHDOG_STALL_S``
after admission, publishes them to their work queue with confirms and writes
their ``dispatched`` event, exactly as the forward agent would.

If such a request was only slow (the forward agent that far behind), it runs
twice; that is harmless because everything downstream is idempotent by
request id (one row, one settlement, the first terminal status wins).
``inferstream_watchdog_redispatched_total`` counts them: in a healthy
pipeline it stays at 0, and anything else is worth a look.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import faust
from aiokafka.errors import KafkaError

from bridges.clients.rabbitmq import PublishError, RabbitClient
from bridges.clients.store import Requests
from inferstream import clock
from inferstream.errors import StoreUnavailable
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from streams.agents import metrics
from streams.topics import Topics, send_events

log = logging.getLogger(__name__)


def _epoch(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else value


def request_of_row(row: Mapping[str, Any]) -> InferenceRequest:
    """The admitted request a ``queued`` row was written from (the row holds every field the work needs)."""
    inputs = list(row.get("input") or [])
    return InferenceRequest(
        request_id=row["request_id"],
        user_id=row["user_id"],
        task=row["task"],
        model=row["model"],
        input=inputs,
        estimated_tokens=int(row.get("estimated_tokens") or 0),
        created_at=_epoch(row["created_at"]) or 0.0,
        quota_day=row.get("quota_day") or "",
        priority=row.get("priority") or "normal",
        params=row.get("params"),
        deadline_at=_epoch(row.get("deadline_at")),
        metadata=row.get("metadata"),
        callback_url=row.get("callback_url"),
        # Not stored; only changes how a one-text embed answer is shaped.
        input_is_list=len(inputs) != 1,
        batch_id=row.get("batch_id"),
        batch_line=row.get("batch_line"),
    )


async def redispatch_stalled(settings: Settings, store: Requests, rabbit: RabbitClient, topics: Topics) -> int:
    """One sweep: how many requests were dispatched again."""
    try:
        rows = await store.stalled_queued(settings.watchdog_stall_s)
    except StoreUnavailable as exc:
        log.warning("watchdog sweep skipped (PostgreSQL): %r", exc)
        return 0
    routes = set(rabbit.routes())
    stalled = [request_of_row(r) for r in rows if (r["task"], r["model"]) in routes]
    if not stalled:
        return 0
    try:
        await rabbit.publish_requests(stalled)
    except PublishError as exc:
        log.warning("watchdog could not publish %d stalled requests; next sweep retries: %r", len(stalled), exc)
        return 0
    now = clock.now()
    try:
        await send_events(topics, [ResultEvent.for_request(r, "dispatched", at=now) for r in stalled])
    except KafkaError as exc:  # published, not marked: the next sweep publishes them once more
        log.warning("watchdog could not write %d dispatched events: %r", len(stalled), exc)
    metrics.REDISPATCHED.inc(len(stalled))
    log.warning(
        "watchdog: %d requests were still queued %.0fs after admission and were dispatched again: %s",
        len(stalled), settings.watchdog_stall_s, ", ".join(r.request_id for r in stalled[:10]),
    )  # fmt: skip
    return len(stalled)


def register_watchdog(app: faust.App, settings: Settings, store: Requests, rabbit: RabbitClient, topics: Topics) -> None:
    @app.timer(interval=settings.watchdog_interval_s, on_leader=True)
    async def watch_stalled_requests() -> None:
        """Leader only: one sweep for the whole deployment."""
        await redispatch_stalled(settings, store, rabbit, topics)
