"""The last stage: rows the sink applied -> the Redis cache, status notifications (SSE on any worker) and webhooks.

The sink calls :meth:`Delivery.on_applied` with the rows a batch changed (and
those it found already current, after a crash); every status a row went
through in the batch is published in order, so each event stream hears each
once. Rows with a ``callback_url`` get a webhook for each of those statuses
their ``webhook_events`` name (None: the terminal ones); every attempt is
recorded in PostgreSQL; the leader re-sends terminal deliveries left pending
by a crash, an outage or a replay. Streamed text reaches webhooks through
:meth:`Delivery.on_output`, at most one call per request every
:data:`OUTPUT_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from bridges.clients.redis import CacheUnavailable, RedisClient
from bridges.clients.store.rows import wants_event
from bridges.clients.store.webhooks import Webhooks
from bridges.clients.webhooks import Attempt, WebhookSender, message_id
from inferstream import tracing
from inferstream.errors import StoreUnavailable
from schemas.documents import earlier_doc, request_doc
from schemas.records import TERMINAL

log = logging.getLogger(__name__)

PENDING_SWEEP_S = 60.0
PENDING_OLDER_THAN_S = 600.0
OUTPUT_INTERVAL_S = 0.5
_OUTPUT_IDLE_S = 600.0  # a throttle not heard of for this long is dropped (its terminal row never came here)


def attempt_recorder(records: Webhooks) -> Callable[[Attempt], Awaitable[None]]:
    """What the webhook sender calls after each attempt: the attempt, and a terminal event's state, in PostgreSQL."""

    async def record(a: Attempt) -> None:
        await records.record_attempt(
            a.request_id, event=a.event, webhook_id=a.webhook_id, attempt=a.attempt, state=a.state,
            http_status=a.http_status, error=a.error, terminal=a.event in TERMINAL,
        )  # fmt: skip

    return record


def output_doc(request_id: str, text_so_far: str, offset: int) -> dict[str, Any]:
    """The body of an ``output`` webhook: the text generated so far (``offset``: where the last delta began)."""
    return {"request_id": request_id, "status": "running", "event": "output",
            "output": {"text": text_so_far, "offset": offset}}  # fmt: skip


@dataclass
class _Throttle:
    """One streaming request's ``output`` webhooks: the latest text waits for its turn."""

    callback_url: str | None
    missing_at: float = 0.0  # when the row was not there yet (read it again later); 0: it was, or the caller told us
    last_sent: float = 0.0
    heard: float = 0.0
    latest: tuple[str, int] | None = None
    timer: asyncio.TimerHandle | None = None
    text: str = ""  # what :meth:`Delivery.on_delta` has put together so far


class OutputSource(Protocol):
    """The Redis side of streamed output (``RedisClient``): publishes deltas, knows the text so far."""

    async def publish_output(self, request_id: str, delta: str, offset: int) -> None: ...

    async def output_so_far(self, request_id: str) -> str: ...


class OutputWebhooks:
    """An output sink (``workers.streaming.install``) that publishes to Redis and feeds :meth:`Delivery.on_output`.

    Install it in place of the Redis client: deltas go to Redis as before, and a request that asked
    for ``output`` webhooks gets them (throttled) from the process that generates it.
    """

    def __init__(self, inner: OutputSource, delivery: Delivery) -> None:
        self.inner = inner
        self.delivery = delivery

    async def publish_output(self, request_id: str, delta: str, offset: int) -> None:
        await self.inner.publish_output(request_id, delta, offset)
        await self.delivery.on_delta(request_id, delta, offset, self.inner.output_so_far)

    async def output_so_far(self, request_id: str) -> str:
        return await self.inner.output_so_far(request_id)


class Delivery:
    """Caches and announces applied rows, and delivers their webhooks."""

    def __init__(self, redis: RedisClient, webhooks: WebhookSender, records: Webhooks) -> None:
        self.redis = redis
        self.webhooks = webhooks
        self.records = records
        self._outputs: dict[str, _Throttle] = {}

    async def on_output(
        self,
        user_id: str,
        request_id: str,
        text_so_far: str,
        offset: int,
        *,
        callback_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        known: bool = False,
    ) -> None:
        """Streamed text of a running request: an ``output`` webhook, throttled per request.

        Cheap to call on every delta: the first call sends at once, later ones within
        :data:`OUTPUT_INTERVAL_S` only replace the text a timer sends at the end of the
        interval (so the receiver always gets the latest text, at most twice a second).
        Pass ``callback_url`` and ``webhook_events`` with ``known=True`` when the caller
        has them (the request carries them); otherwise they are read from PostgreSQL
        once per request. A request that did not ask for ``output`` costs a dict lookup.
        ``user_id`` is for the caller's symmetry with the SSE side; the request id names
        the row. Never raises for the store: the text is dropped with a warning.
        """
        del user_id
        throttle = await self._throttle(request_id, callback_url, webhook_events, known)
        if throttle is None:
            return
        throttle.latest = (text_so_far, offset)
        throttle.text = text_so_far
        if throttle.timer is not None:
            return
        wait = throttle.last_sent + OUTPUT_INTERVAL_S - throttle.heard
        if wait <= 0:
            self._send_output(request_id)
        else:
            throttle.timer = asyncio.get_running_loop().call_later(wait, self._send_output, request_id)

    async def on_delta(
        self, request_id: str, delta: str, offset: int, so_far: Callable[[str], Awaitable[str]]
    ) -> None:
        """One delta (``offset``: where it begins) instead of the whole text: :meth:`on_output` with the text so far.

        The text is put together here; ``so_far`` (Redis) is read only when a delta does not
        follow the text known here (a redelivered request resumed by this process).
        """
        throttle = await self._throttle(request_id, None, None, False)
        if throttle is None:
            return
        if len(throttle.text) == offset:
            text = throttle.text + delta
        else:
            try:
                text = await so_far(request_id)
            except CacheUnavailable as exc:
                log.warning("output webhook of %s skipped: %r", request_id, exc)
                return
        await self.on_output("", request_id, text, offset)

    async def _throttle(
        self, request_id: str, callback_url: str | None, events: Sequence[str] | None, known: bool
    ) -> _Throttle | None:
        """The request's throttle if it wants ``output`` webhooks; a row not written yet is read again later."""
        now = time.monotonic()
        throttle = self._outputs.get(request_id)
        if throttle is None or (throttle.missing_at and now - throttle.missing_at > OUTPUT_INTERVAL_S):
            if len(self._outputs) > 1000:
                self._forget_idle(now)
            url, found = await self._output_target(request_id, callback_url, events, known)
            throttle = self._outputs[request_id] = _Throttle(url, missing_at=0.0 if found else now)
        throttle.heard = now
        return throttle if throttle.callback_url is not None else None

    async def _output_target(
        self, request_id: str, callback_url: str | None, events: Sequence[str] | None, known: bool
    ) -> tuple[str | None, bool]:
        """Where ``output`` webhooks of the request go (None: nowhere), and whether that is settled."""
        if not known:
            try:
                row = await self.records.webhook_target(request_id)
            except StoreUnavailable as exc:
                log.warning("output webhook target of %s unknown: %r", request_id, exc)
                row = None
            if row is None:
                return None, False
            callback_url, events = row.get("callback_url"), row.get("webhook_events")
        return (callback_url if callback_url and wants_event(events, "output") else None), True

    def _send_output(self, request_id: str) -> None:
        throttle = self._outputs.get(request_id)
        if throttle is None or throttle.latest is None or throttle.callback_url is None:
            return
        throttle.timer = None
        text, offset = throttle.latest
        throttle.latest, throttle.last_sent = None, time.monotonic()
        self.webhooks.submit(
            request_id, throttle.callback_url, output_doc(request_id, text, offset),
            event="output", webhook_id=message_id(request_id, "output", offset), retry=False,
        )  # fmt: skip

    def _end_output(self, request_id: str) -> None:
        """The request is terminal: no ``output`` after it (the terminal document has the whole text)."""
        throttle = self._outputs.pop(request_id, None)
        if throttle is not None and throttle.timer is not None:
            throttle.timer.cancel()

    def _forget_idle(self, now: float) -> None:
        for request_id in [r for r, t in self._outputs.items() if now - t.heard > _OUTPUT_IDLE_S]:
            self._end_output(request_id)

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
        for r, final in zip(rows, finals, strict=True):
            if r["status"] in TERMINAL and self._outputs:
                self._end_output(r["request_id"])
            if r.get("callback_url"):
                self._webhooks(r, final)

    def _webhooks(self, row: dict[str, Any], final: dict[str, Any]) -> None:
        """A webhook per status the batch took the row through that the request asked for, in order."""
        events = row.get("webhook_events")
        for p in row.get("passed", ()):
            if events is not None and wants_event(events, p["status"]):
                self.webhooks.submit(row["request_id"], row["callback_url"], earlier_doc(row, p["status"], p["at"]))
        if wants_event(events, row["status"]):
            self.webhooks.submit(row["request_id"], row["callback_url"], final)

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
            if row.get("callback_url") and not self.webhooks.delivering(row["request_id"], row["status"]):
                self.webhooks.submit(row["request_id"], row["callback_url"], request_doc(row))

    async def redeliver(self, row: dict[str, Any]) -> str:
        """Send the request's last webhook event again (same ``webhook-id``); returns the event.

        The last event is the latest status event attempted, or the row's current status if none
        was. An ``output`` event is not resent: the text it carried is not kept (the terminal
        document carries all of it).
        """
        attempts = await self.records.list_attempts(row["request_id"], 1000)
        statuses = [a["event"] for a in attempts if a["event"] != "output"]
        event = statuses[-1] if statuses else str(row["status"])
        final = request_doc(row)
        if event == row["status"]:
            doc = final
        else:
            at = next((h["at"] for h in _history(row) if h.get("status") == event), None)
            doc = earlier_doc(row, event, at if at is not None else row["updated_at"])
        self.webhooks.submit(row["request_id"], row["callback_url"], doc, event=event)
        return event


def _history(row: dict[str, Any]) -> list[dict[str, Any]]:
    history = row.get("history") or []
    return list(orjson.loads(history) if isinstance(history, str | bytes) else history)
