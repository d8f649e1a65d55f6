"""Webhook delivery state on request rows: what is still due, and each attempt's outcome."""

from __future__ import annotations

from typing import Any

from bridges.clients.store.pool import Aggregate, limit_of
from schemas.documents import REQUEST_COLUMNS

_ROW = ", ".join(REQUEST_COLUMNS)


class Webhooks(Aggregate):
    async def pending_webhooks(self, limit: int = 100, *, older_than_s: float = 0.0) -> list[dict[str, Any]]:
        """Terminal rows with a callback whose delivery is still due, oldest first.

        ``older_than_s`` skips rows that reached their status more recently (their
        delivery is probably still being retried by the worker that sank them).
        """
        return await self.pool.read(
            f"SELECT {_ROW}, webhook_attempts FROM requests WHERE webhook_state = 'pending'"
            " AND ($2 = 0 OR updated_at < now() - make_interval(secs => $2))"
            " ORDER BY updated_at LIMIT $1",
            limit_of(limit),
            float(older_than_s),
        )

    async def record_webhook_attempt(
        self, request_id: str, *, delivered: bool, error: str | None = None, final: bool = False
    ) -> None:
        """One delivery attempt: delivered, or failed (``final`` gives up and marks it failed)."""
        await self.pool.execute(
            "UPDATE requests SET webhook_attempts = webhook_attempts + 1,"
            " webhook_state = CASE WHEN $2 THEN 'delivered' WHEN $4 THEN 'failed' ELSE 'pending' END,"
            " webhook_last_error = $3,"
            " webhook_delivered_at = CASE WHEN $2 THEN now() ELSE webhook_delivered_at END"
            " WHERE request_id = $1",
            request_id,
            delivered,
            error,
            final,
        )

    async def record_attempt(
        self,
        request_id: str,
        *,
        event: str,
        webhook_id: str,
        attempt: int,
        state: str,
        http_status: int | None,
        error: str | None,
        terminal: bool,
    ) -> None:
        """One attempt of one event, kept for the attempts list; a terminal event's also moves the row's state.

        One statement either way, so an attempt costs one round trip.
        """
        await self.pool.execute(
            "WITH attempt AS (INSERT INTO webhook_attempts"
            " (request_id, event, webhook_id, attempt, state, http_status, error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7))"
            " UPDATE requests SET webhook_attempts = webhook_attempts + 1,"
            " webhook_state = $5, webhook_last_error = $7,"
            " webhook_delivered_at = CASE WHEN $5 = 'delivered' THEN now() ELSE webhook_delivered_at END"
            " WHERE request_id = $1 AND $8",
            request_id,
            event,
            webhook_id,
            attempt,
            state,
            http_status,
            error,
            terminal,
        )

    async def list_attempts(self, request_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The request's delivery attempts, oldest first (the newest ``limit``)."""
        rows = await self.pool.read(
            "SELECT at, event, webhook_id, attempt, state, http_status, error FROM webhook_attempts"
            " WHERE request_id = $1 ORDER BY at DESC LIMIT $2",
            request_id,
            limit_of(limit),
        )
        return rows[::-1]

    async def webhook_target(self, request_id: str) -> dict[str, Any] | None:
        """The request's ``callback_url`` and ``webhook_events`` (None if the row is not there yet)."""
        return await self.pool.read_one(
            "SELECT callback_url, webhook_events FROM requests WHERE request_id = $1", request_id
        )
