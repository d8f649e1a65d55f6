"""Dead-letter recorder: RabbitMQ ``{ns}.dead-letters`` -> PostgreSQL ``dead_letters``, then ack.

PostgreSQL is the dead letters' source of truth (``faust -A streams redrive``
lists and re-submits from there); the queue is only how they arrive. Each
message is recorded (an idempotent upsert by request id) before it is acked,
one at a time, retrying while PostgreSQL is down (:data:`inferstream.retrying.DEAD_LETTER_RECORD`), so none is lost
and the small prefetch bounds what waits in memory. A message whose body is
not a request (nothing could ever redrive it) is logged in full and acked.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage
from mode import Service
from prometheus_client import Counter
from tenacity import RetryCallState

from bridges.clients.rabbitmq import AMQP_ERRORS, InboxConsumer, RabbitClient
from bridges.clients.store import DeadLetters
from inferstream import logs
from inferstream.errors import StoreUnavailable
from inferstream.retrying import DEAD_LETTER_RECORD, failure, next_sleep
from inferstream.settings import Settings
from schemas.records import InferenceRequest

__all__ = ["DEAD_LETTERS", "DeadLetterRecorder", "decode_dead_letter"]

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "inferstream_dead_letters_total",
    "Dead letters recorded in PostgreSQL by route (a redelivered one may count twice; the row is upserted once).",
    ["task", "model"],
)
UNDECODABLE = ("unknown", "unknown")  # the labels of a dead letter whose body is not a request


def _rejection(message: AbstractIncomingMessage) -> dict[str, Any]:
    # A message a worker rejected carries no ``error`` header; RabbitMQ's x-death says why.
    deaths = (message.headers or {}).get("x-death") or []
    first: Any = deaths[0] if isinstance(deaths, list) and deaths else {}
    reason = first.get("reason", "unknown") if isinstance(first, dict) else "unknown"
    queue = first.get("queue", "?") if isinstance(first, dict) else "?"
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return {"type": "rejected", "message": f"{text(reason)} from {text(queue)}"}


def decode_dead_letter(
    message: AbstractIncomingMessage,
) -> tuple[InferenceRequest, dict[str, Any], list[dict[str, Any]]]:
    """``(request, error, history)``; raises ``ValueError`` when the body is not a request."""
    try:
        info = RabbitClient.dead_letter_info(message)
        request = InferenceRequest.from_data(info["request"])
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a dead-lettered request: {exc!r}") from exc
    error = info["error"] if isinstance(info["error"], dict) else _rejection(message)
    history = [h for h in info["history"] if isinstance(h, dict)]
    return request, error, history


class DeadLetterRecorder(InboxConsumer):
    """Consumes the dead-letter queue into ``Store.record_dead_letter``."""

    def __init__(
        self,
        settings: Settings,
        rabbit: RabbitClient,
        store: DeadLetters,
        *,
        prefetch: int = 16,
        retry_base_s: float = DEAD_LETTER_RECORD.base_s,
        retry_max_s: float = DEAD_LETTER_RECORD.cap_s,
        **kwargs: Any,
    ) -> None:
        super().__init__(rabbit, rabbit.dead_letter_queue_name, prefetch=prefetch, **kwargs)
        self.settings = settings
        self.store = store
        self.retry = DEAD_LETTER_RECORD.tuned(retry_base_s, retry_max_s)
        self.recorded = 0

    @Service.task
    async def _record_loop(self) -> None:
        while not self.should_stop:
            message = await self._inbox.get()
            try:
                request, error, history = decode_dead_letter(message)
            except ValueError as exc:
                # Neither headers nor body: the body holds the prompt (never logged).
                log.error("dropping dead letter %s (%d bytes): %s", message.message_id, len(message.body), exc)
                DEAD_LETTERS.labels(*UNDECODABLE).inc()
            else:
                with logs.bind_request_id(request.request_id):  # one loop task for every letter
                    await self._record(request, error, history)
            try:
                await message.ack()
            except AMQP_ERRORS as exc:
                # Redelivered later and recorded again: the upsert is idempotent.
                log.warning("could not ack dead letter %s: %r", message.message_id, exc)

    async def _record(
        self, request: InferenceRequest, error: dict[str, Any], history: list[dict[str, Any]]
    ) -> None:
        async def failed(state: RetryCallState) -> None:
            exc = failure(state)
            log.warning(
                "recording dead letter %s failed (attempt %d): %r; retrying in %.2fs",
                request.request_id, state.attempt_number, exc, next_sleep(state),
            )  # fmt: skip
            if isinstance(exc, StoreUnavailable) and exc.broken_connection:
                await self.store.reset()

        async for attempt in self.retry.retrying(StoreUnavailable, before_sleep=failed):
            with attempt:
                await self.store.record_dead_letter(request, error, history)
        self.recorded += 1
        DEAD_LETTERS.labels(request.task, request.model).inc()
        log.info("dead letter %s recorded (%s)", request.request_id, error.get("type"))
