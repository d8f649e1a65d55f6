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
