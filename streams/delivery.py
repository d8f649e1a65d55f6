"""The last stage: rows the sink applied -> the Redis cache, status notifications (SSE on any worker) and webhooks.

The sink calls :meth:`Delivery.on_applied` with the rows a batch changed (and
those it found already current, after a crash); every status a row went
through in the batch is published in order, so each event stream hears each
once. Terminal rows with a ``callback_url`` are handed to the webhook sender,
whose attempts are recorded in PostgreSQL; the leader re-sends deliveries left
pending by a crash, an outage or a replay.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store.webhooks import Webhooks
from bridges.clients.webhooks import WebhookSender
from inferstream import tracing
from inferstream.errors import StoreUnavailable
from schemas.documents import earlier_doc, request_doc
from schemas.records import TERMINAL

log = logging.getLogger(__name__)

PENDING_SWEEP_S = 60.0
PENDING_OLDER_THAN_S = 600.0


def attempt_recorder(records: Webhooks) -> Callable[[str, str, int, str | None], Awaitable[None]]:
    """What the webhook sender calls after each attempt: the delivery state, in PostgreSQL."""

    async def record(request_id: str, state: str, attempts: int, last_error: str | None) -> None:
        await records.record_webhook_attempt(
            request_id, delivered=state == "delivered", error=last_error, final=state == "failed"
        )

    return record


class Delivery:
    """Caches and announces applied rows, and delivers their webhooks."""

    def __init__(self, redis: RedisClient, webhooks: WebhookSender, records: Webhooks) -> None:
        self.redis = redis
        self.webhooks = webhooks
        self.records = records

    async def on_applied(self, rows: Sequence[dict[str, Any]]) -> None:
        finals = [request_doc(r) for r in rows]
        docs = [
            (r["user_id"], doc)
            for r, final in zip(rows, finals, strict=True)
            for doc in (*(earlier_doc(r, p["status"], p["at"]) for p in r.get("passed", ())), final)
        ]
        spans = self._notify_spans(rows) if tracing.ENABLED else []
        try:
            await self.redis.cache_and_publish(docs)
        except CacheUnavailable as exc:
            log.warning("%d docs not cached/published (Redis): %r", len(docs), exc)
            tracing.end_all(spans, exc)
        else:
            tracing.end_all(spans)
        for r, doc in zip(rows, finals, strict=True):
            if r.get("callback_url") and r["status"] in TERMINAL:
                self.webhooks.submit(r["request_id"], r["callback_url"], doc)

    @staticmethod
    def _notify_spans(rows: Sequence[dict[str, Any]]) -> list[tracing.Span]:
        """A ``notify`` span per row, under the sink span of its request (set by the sink agent)."""
        sink_spans = tracing.SINK_SPANS.get() or {}
        spans = []
        for row in rows:
            parent = sink_spans.get(row["request_id"])
            if parent is None:
                continue  # not written by a traced sink batch (a replay, a test)
            spans.append(tracing.start(
                "notify", tracing.context_with(parent), kind=tracing.SpanKind.PRODUCER,
                attributes={"inferstream.request_id": row["request_id"], "inferstream.status": str(row["status"]),
                            "messaging.system": "redis", "inferstream.statuses": 1 + len(row.get("passed", ()))},
            ))  # fmt: skip
        return spans

    async def resend_pending(self) -> None:
        """Deliveries left pending by a crash, an outage or a replay (run by the leader only)."""
        try:
            rows = await self.records.pending_webhooks(100, older_than_s=PENDING_OLDER_THAN_S)
        except StoreUnavailable as exc:
            log.warning("pending webhook sweep skipped: %r", exc)
            return
        for row in rows:
            if row.get("callback_url") and not self.webhooks.delivering(row["request_id"]):
                self.webhooks.submit(row["request_id"], row["callback_url"], request_doc(row))
