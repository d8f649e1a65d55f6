"""Request rows: the sink's batched idempotent upsert, the gateway's reads, the watchdog's stalled rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridges.clients.store.pool import Aggregate, limit_of
from bridges.clients.store.rows import UPSERT_REPORT_CURRENT_SQL, UPSERT_SQL, Event, collapse
from schemas.documents import REQUEST_COLUMNS

_ROW = ", ".join(REQUEST_COLUMNS)


class Requests(Aggregate):
    async def upsert_events(
        self, items: Sequence[Event], *, report_current: bool = False
    ) -> list[dict[str, Any]]:
        """Apply a batch of events in one statement; returns the rows whose status advanced.

        ``report_current`` also returns rows already at the status the batch brings them to:
        for a retry of a write that may have committed, so no notification is lost.
        """
        rows = collapse(items)
        if not rows:
            return []
        return await self.pool.write(UPSERT_REPORT_CURRENT_SQL if report_current else UPSERT_SQL, rows)

    async def get_request(self, user_id: str, request_id: str) -> dict[str, Any] | None:
        """The row, or None when it does not exist or belongs to another user."""
        return await self.pool.read_one(
            f"SELECT {_ROW} FROM requests WHERE request_id = $1 AND user_id = $2",
            request_id,
            user_id,
        )

    async def list_requests(
        self, user_id: str, status: str | None = None, limit: int = 50, after: str | None = None
    ) -> list[dict[str, Any]]:
        """The user's rows newest first; ``after`` is the last request id of the previous page."""
        where, args = ["user_id = $1"], [user_id]
        if status is not None:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if after is not None:
            args.append(after)
            where.append(f"request_id < ${len(args)}")
        sql = (
            f"SELECT {_ROW} FROM requests WHERE {' AND '.join(where)}"
            f" ORDER BY request_id DESC LIMIT {limit_of(limit)}"
        )
        return await self.pool.read(sql, *args)

    async def stalled_queued(self, older_than_s: float, limit: int = 500) -> list[dict[str, Any]]:
        """Rows still ``queued`` ``older_than_s`` after their last change, oldest first (the watchdog's),
        with their batch and line (a batch line dispatched again must still count for its batch)."""
        return await self.pool.read(
            f"SELECT {_ROW}, batch_id, batch_line FROM requests WHERE status = 'queued'"
            " AND updated_at < now() - make_interval(secs => $2) ORDER BY updated_at LIMIT $1",
            limit_of(limit),
            float(older_than_s),
        )
