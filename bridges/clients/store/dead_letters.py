"""Dead letters: requests that exhausted their attempts, kept for ``redrive``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bridges.clients.store.pool import Aggregate, limit_of
from inferstream import clock
from schemas.records import InferenceRequest


class DeadLetters(Aggregate):
    async def record_dead_letter(
        self,
        request: InferenceRequest,
        error: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Keep a request that exhausted its attempts; a second death re-opens it for redrive."""
        await self.pool.execute(
            "INSERT INTO dead_letters (request_id, user_id, payload, error, history)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO UPDATE SET"
            " payload = EXCLUDED.payload, error = EXCLUDED.error, history = EXCLUDED.history,"
            " redriven_at = NULL",
            request.request_id,
            request.user_id,
            request.asdict(),
            None if error is None else dict(error),
            [dict(h) for h in history or ()],
        )

    async def list_dead_letters(
        self, limit: int = 100, *, pending_only: bool = False
    ) -> list[dict[str, Any]]:
        """Newest first; ``pending_only`` leaves out those already redriven."""
        where = "WHERE redriven_at IS NULL" if pending_only else ""
        return await self.pool.read(
            f"SELECT * FROM dead_letters {where} ORDER BY created_at DESC, request_id LIMIT $1",
            limit_of(limit),
        )

    async def get_dead_letter(self, request_id: str) -> dict[str, Any] | None:
        return await self.pool.read_one("SELECT * FROM dead_letters WHERE request_id = $1", request_id)

    async def mark_redriven(self, request_id: str, new_request_id: str | None = None) -> bool:
        """Record a re-submission on the dead letter and in the request row's history."""
        entry: list[dict[str, Any]] = [{"status": "redriven", "at": clock.now()}]
        if new_request_id is not None:
            entry[0]["request_id"] = new_request_id
        async with self.pool.transaction() as conn:
            status = await conn.execute(
                "UPDATE dead_letters SET redriven_at = now(), redrive_count = redrive_count + 1"
                " WHERE request_id = $1",
                request_id,
            )
            if not status.endswith(" 1"):
                return False
            await conn.execute(
                "UPDATE requests SET history = history || $2 WHERE request_id = $1",
                request_id,
                entry,
            )
        return True
