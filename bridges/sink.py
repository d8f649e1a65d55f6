"""The PostgreSQL sink: writes one batch of events, retrying until PostgreSQL takes it.

The caller (a Faust agent reading ``stream.take(...)``) hands over one batch at
a time and acks the log offsets only after ``write`` returns, so a PostgreSQL
outage stops the consumer instead of growing memory, and nothing is dropped:
``write`` retries (:data:`inferstream.retrying.POSTGRES_WRITE`) while the database
is unreachable, until it succeeds or the sink is stopped. The upsert is
idempotent, so a batch written twice (a timeout after the commit, a replayed
offset) changes nothing the second time. Errors that another attempt cannot
fix (a bug, a missing table) are raised, not retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Histogram
from tenacity import RetryCallState

from bridges.clients.store.rows import TERMINAL_RANK, Event, passed_through
from inferstream import clock
from inferstream.errors import InferstreamError, StoreUnavailable
from inferstream.retrying import POSTGRES_WRITE, failure, next_sleep
from inferstream.settings import Settings

log = logging.getLogger(__name__)

OnApplied = Callable[[list[dict[str, Any]]], Awaitable[None]]
END_TO_END = Histogram(
    "inferstream_end_to_end_seconds",
    "From admission (created_at) to the terminal row applied in PostgreSQL, once per request.",
    ["task", "model", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)


class SinkStopped(InferstreamError):
    """The sink was stopped while a batch was still unwritten; its offsets must not be acked."""


class UpsertStore(Protocol):
    async def upsert_events(
        self, items: Sequence[Event], *, report_current: bool = False
    ) -> list[dict[str, Any]]: ...

    async def reset(self) -> None: ...


class ResultSink:
    """Writes batches to PostgreSQL through ``store``; calls ``on_applied`` with the changed rows.

    A row that the batch moved through several statuses carries them, below its own, in
    ``row["passed"]`` (see :func:`bridges.clients.store.rows.passed_through`): the stored row
    keeps only the last, and listeners must still hear each one.
    """

    def __init__(
        self,
        settings: Settings,
        store: UpsertStore,
        on_applied: OnApplied | None = None,
        *,
        retry_base_s: float = POSTGRES_WRITE.base_s,
        retry_max_s: float = POSTGRES_WRITE.cap_s,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_applied = on_applied
        self.retry = POSTGRES_WRITE.tuned(retry_base_s, retry_max_s)
        self._stopped = asyncio.Event()
        # Counters for metrics and tests.
        self.batches_written = 0
        self.events_written = 0
        self.rows_changed = 0
        self.failures = 0
        self._e2e: dict[tuple[str, str, str], Any] = {}

    async def stop(self) -> None:
        """Interrupt a write that is waiting for PostgreSQL: it raises ``SinkStopped``."""
        self._stopped.set()

    async def write(self, items: Sequence[Event]) -> None:
        """Upsert ``items``; returns only once they are committed (or raises ``SinkStopped``)."""
        if not items:
            return
        async for attempt in self.retry.retrying(
            StoreUnavailable, before_sleep=lambda state: self._failed(state, len(items)), sleep=self._sleep
        ):
            with attempt:
                if self._stopped.is_set():
                    raise SinkStopped(f"sink stopped with {len(items)} events unwritten")
                # Rows already at the batch's status are reported too: a failed attempt may
                # have committed, and a batch replayed after a crash (kill -9 between the
                # PostgreSQL commit and the Redis write) finds its rows applied. Reporting only
                # changed rows left the cache at `queued` and SSE without the terminal event.
                # It costs ~8% of batched upsert throughput (bench/sink.py).
                rows = await self.store.upsert_events(items, report_current=True)
        self.batches_written += 1
        self.events_written += len(items)
        # Rows reported only because they were already current (a replay) changed nothing.
        changed = [r for r in rows if r.get("prev_rank") is None or r["prev_rank"] < r["status_rank"]]
        self.rows_changed += len(changed)
        self._observe_finished(changed)
        if rows and self.on_applied is not None:
            passed_through(items, rows)
            await self._notify(rows)

    def _observe_finished(self, changed: list[dict[str, Any]]) -> None:
        """``inferstream_end_to_end_seconds`` for the rows this write made terminal (a replay adds none)."""
        now = None
        for row in changed:
            if row.get("status_rank", 0) < TERMINAL_RANK or row.get("created_at") is None:
                continue
            created = row["created_at"]
            now = clock.now() if now is None else now
            start = created.timestamp() if isinstance(created, datetime) else float(created)
            key = (str(row.get("task") or ""), str(row.get("model") or ""), str(row["status"]))
            child = self._e2e.get(key)
            if child is None:
                child = self._e2e[key] = END_TO_END.labels(*key)
            child.observe(max(0.0, now - start))

    async def _failed(self, state: RetryCallState, count: int) -> None:
        exc = failure(state)
        self.failures += 1
        log.warning(
            "sink: writing %d events to PostgreSQL failed (attempt %d): %s: %s; retrying in %.2fs",
            count, state.attempt_number, type(exc).__name__, exc, next_sleep(state),
        )  # fmt: skip
        if isinstance(exc, StoreUnavailable) and exc.broken_connection:
            await self.store.reset()  # the pool itself may be closed or broken

    async def _sleep(self, delay: float) -> None:
        """Waits ``delay`` or until the sink is stopped; the next attempt then raises ``SinkStopped``."""
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout=delay)
        except TimeoutError:
            pass

    async def _notify(self, rows: list[dict[str, Any]]) -> None:
        # The rows are committed; a cache or pub/sub failure must not make us write them again.
        assert self.on_applied is not None
        try:
            await self.on_applied(rows)
        except Exception:  # the callback is the caller's code; log with traceback, go on
            log.exception("sink: on_applied failed for %d rows (rows are stored)", len(rows))
