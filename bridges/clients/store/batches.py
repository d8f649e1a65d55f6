"""Batches of the Batch API in PostgreSQL: each batch's object as last written, and its lines' request rows.

The live state of a batch is its entry in the ``batches`` Faust table
(``tables/batches.py``); this is where the batch is listed, and its final
state kept. A document is the OpenAI batch object plus ``user_id`` (never
shown to the caller: the batch service drops it). Writes are idempotent:
inserting a batch twice keeps the first, and a final status is never
overwritten by a different one (a stale write replayed after a crash).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bridges.clients.store.files import FINAL_BATCH_STATUSES
from bridges.clients.store.pool import Aggregate, limit_of
from schemas.records import TERMINAL

Doc = dict[str, Any]
Docs = list[Doc]  # module level: the aggregate's own `list` method shadows the builtin in its body
_FINAL = ", ".join(f"'{s}'" for s in FINAL_BATCH_STATUSES)
_TERMINAL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
LINE_COLUMNS: tuple[str, ...] = (
    "request_id", "batch_line", "status", "result", "error", "usage", "model", "task",
    "created_at", "completed_at",
)  # fmt: skip


def _created_at(doc: Doc) -> datetime:
    return datetime.fromtimestamp(float(doc["created_at"]), UTC)


class Batches(Aggregate):
    async def insert(self, doc: Doc) -> None:
        """Record a new batch (``doc``: the batch object with ``user_id``); a second insert is a no-op."""
        await self.pool.execute(
            "INSERT INTO batches (batch_id, user_id, input_file_id, status, doc, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
            doc["id"],
            doc["user_id"],
            doc["input_file_id"],
            doc["status"],
            doc,
            _created_at(doc),
        )

    async def update(self, doc: Doc) -> None:
        """Store the batch's object as it is now; a row already final keeps its status (and doc)
        unless ``doc`` brings that same status again."""
        await self.pool.execute(
            "UPDATE batches SET status = $2, doc = $3, updated_at = now()"
            f" WHERE batch_id = $1 AND (status NOT IN ({_FINAL}) OR status = $2)",
            doc["id"],
            doc["status"],
            doc,
        )

    async def get(self, user_id: str, batch_id: str) -> Doc | None:
        """The batch's document; None when absent or someone else's."""
        row = await self.pool.read_one(
            "SELECT doc FROM batches WHERE batch_id = $1 AND user_id = $2", batch_id, user_id
        )
        return row["doc"] if row is not None else None

    async def list(self, user_id: str, limit: int = 20, after: str | None = None) -> Docs:
        """The user's batch documents newest first; ``after`` is the last batch id of the previous page."""
        rows = await self.pool.read(
            "SELECT doc FROM batches WHERE user_id = $1 AND ($2::text IS NULL OR batch_id < $2)"
            f" ORDER BY batch_id DESC LIMIT {limit_of(limit)}",
            user_id,
            after,
        )
        return [r["doc"] for r in rows]

    async def terminal_rows(self, batch_id: str) -> int:
        """How many of the batch's lines PostgreSQL holds at a terminal status (the sink may lag)."""
        row = await self.pool.read_one(
            f"SELECT count(*) AS n FROM requests WHERE batch_id = $1 AND status IN ({_TERMINAL})",
            batch_id,
        )
        return int(row["n"]) if row is not None else 0

    async def line_rows(self, batch_id: str, start: int = 0, limit: int | None = None) -> Docs:
        """The batch's request rows by line: lines ``start`` onwards, at most ``limit`` (None: all).

        Page through a large batch (``limit`` of a few thousand): 50,000 embedding
        results decoded at once are hundreds of MB of Python objects.
        """
        page = "" if limit is None else f" LIMIT {max(1, int(limit))}"
        return await self.pool.read(
            f"SELECT {', '.join(LINE_COLUMNS)} FROM requests WHERE batch_id = $1 AND batch_line >= $2"
            f" ORDER BY batch_line{page}",
            batch_id,
            start,
        )
