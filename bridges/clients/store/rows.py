"""Turns a batch of request and result events into one idempotent upsert of ``requests`` rows.

The batch is first collapsed in Python to one row per request id (the
highest-ranked status wins, fields only other events know are merged in), so
PostgreSQL sees each id once and the whole batch is one statement. In the
database the same rule holds between batches: a row's status only moves up
the lifecycle, a stale or repeated event can only fill fields that are still
empty (the request's input arriving after its result), and only rows whose
status actually advanced are returned. :func:`passed_through` then tells, for
each returned row, which earlier statuses the batch's own events carried, so
each status change can still be announced once, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import orjson

from schemas.documents import REQUEST_COLUMNS
from schemas.records import STATUS_RANK, TERMINAL, InferenceRequest, ResultEvent

log = logging.getLogger(__name__)

Event = InferenceRequest | ResultEvent
Row = dict[str, Any]

TERMINAL_RANK = max(STATUS_RANK.values())
_DISPATCHED = STATUS_RANK["dispatched"]
# Known from whichever event carries them; the first value seen is kept.
FILL_FIELDS: tuple[str, ...] = (
    "task", "model", "priority", "estimated_tokens", "created_at", "quota_day",
    "input", "params", "metadata", "deadline_at", "callback_url", "dispatched_at", "started_at",
    "webhook_events", "batch_id", "batch_line",
)  # fmt: skip
# Only the event that moves the status forward may set these.
ADVANCE_FIELDS: tuple[str, ...] = (
    "status",
    "status_rank",
    "result",
    "error",
    "usage",
    "completed_at",
    "backend",
)
TIMESTAMPS: frozenset[str] = frozenset(
    {"created_at", "updated_at", "dispatched_at", "started_at", "completed_at", "deadline_at"}
)
RETURNED_COLUMNS: tuple[str, ...] = (*REQUEST_COLUMNS, "webhook_state")
# Written, not returned: a batch line's batch and 0-based line (InferenceRequest; ResultEvent has batch_id).
UPSERT_COLUMNS: tuple[str, ...] = (*RETURNED_COLUMNS, "batch_id", "batch_line")


def wants_event(webhook_events: Any, event: str) -> bool:
    """Whether a request's ``webhook_events`` (None: the terminal statuses) include ``event``."""
    if webhook_events is None:
        return event in TERMINAL
    if isinstance(webhook_events, str | bytes):  # a jsonb column read without a codec
        webhook_events = orjson.loads(webhook_events)
    return event in webhook_events


def _blank(value: Any) -> Any:
    # ResultEvent's defaults ("" and 0) mean "not known", not a value to store.
    return None if value in ("", 0, 0.0) else value


def row_of(item: Event) -> Row | None:
    """The partial row one event knows about; None for an event with an unknown status."""
    if isinstance(item, InferenceRequest):
        return {
            "request_id": item.request_id,
            "user_id": item.user_id,
            "task": item.task,
            "model": item.model,
            "priority": item.priority,
            "status": "queued",
            "status_rank": STATUS_RANK["queued"],
            "input": list(item.input),
            "params": item.params,
            "metadata": item.metadata,
            "estimated_tokens": item.estimated_tokens,
            "attempts": 0,
            "created_at": item.created_at,
            "updated_at": item.created_at,
            "deadline_at": item.deadline_at,
            "callback_url": item.callback_url,
            "quota_day": item.quota_day,
            "history": [{"status": "queued", "at": item.created_at}],
            "webhook_events": item.webhook_events,
            "batch_id": item.batch_id,
            "batch_line": item.batch_line,  # 0 is a line, not "unknown": never _blank
        }
    rank = STATUS_RANK.get(item.status)
    if rank is None:
        log.error("result event %s has unknown status %r; ignored", item.request_id, item.status)
        return None
    return {
        "request_id": item.request_id,
        "user_id": item.user_id,
        "task": _blank(item.task),
        "model": _blank(item.model),
        "priority": _blank(item.priority),
        "status": item.status,
        "status_rank": rank,
        "estimated_tokens": _blank(item.estimated_tokens),
        "attempts": item.attempts,
        "result": item.result,
        "error": item.error,
        "usage": item.usage,
        "created_at": _blank(item.created_at),
        "updated_at": item.at,
        "dispatched_at": item.at if item.status == "dispatched" else item.dispatched_at,
        "started_at": item.at if item.status == "running" else item.started_at,
        "completed_at": item.at if item.status in TERMINAL else None,
        "callback_url": item.callback_url,
        "quota_day": _blank(item.quota_day),
        "history": _event_history(item),
        "backend": item.backend,
        "webhook_events": item.webhook_events,
        "batch_id": item.batch_id,
    }


def _event_history(item: ResultEvent) -> list[dict[str, Any]]:
    """The event's own status, preceded by `running` when a terminal event says when work began, and by
    `dispatched` when a later event says when the request was handed to RabbitMQ."""
    entries = [{"status": item.status, "at": item.at}]
    if item.started_at is not None and item.status in TERMINAL:
        entries.insert(0, {"status": "running", "at": item.started_at})
    if item.dispatched_at is not None and item.status != "dispatched":
        entries.insert(0, {"status": "dispatched", "at": item.dispatched_at})
    return entries


def merge(first: Row, second: Row) -> Row:
    """Two partial rows of one request; ``first`` came earlier in the log and wins ties."""
    winner, other = (
        (second, first) if second["status_rank"] > first["status_rank"] else (first, second)
    )
    merged = dict(winner)
    for name in FILL_FIELDS:
        if merged.get(name) is None:
            merged[name] = other.get(name)
    merged["attempts"] = max(first.get("attempts") or 0, second.get("attempts") or 0)
    seen = {entry["status"] for entry in winner["history"]}
    extra = [
        e
        for e in other["history"]
        if e["status"] not in seen
        and not (e["status"] in TERMINAL and winner["status"] in TERMINAL)
    ]
    merged["history"] = sorted([*winner["history"], *extra], key=lambda e: e["at"])
    return merged


def collapse(items: Iterable[Event]) -> list[Row]:
    """One merged row per request id, sorted by id so concurrent writers lock rows in one order."""
    rows: dict[str, Row] = {}
    for item in items:
        row = row_of(item)
        if row is None:
            continue
        current = rows.get(row["request_id"])
        rows[row["request_id"]] = row if current is None else merge(current, row)
    out = []
    for request_id in sorted(rows):
        row = rows[request_id]
        terminal = row["status_rank"] >= TERMINAL_RANK
        due = terminal and row.get("callback_url") and wants_event(row.get("webhook_events"), row["status"])
        row["webhook_state"] = "pending" if due else None
        out.append({k: v for k, v in row.items() if v is not None})
    return out


def passed_through(items: Iterable[Event], rows: Iterable[Row]) -> None:
    """Set ``row["passed"]`` to the statuses this batch took each row through below its own.

    Entries are ``{"status", "at"}`` in rank order: those above the row's ``prev_rank`` (its
    rank before the batch; absent or None means new) that the batch's own events carried, the
    first event of each rank winning as in :func:`collapse`. A terminal event's ``started_at``
    implies `running` in the row's history, but fast work announces no `running` and neither
    does this. `dispatched` is added when work began (a `running` event, or ``started_at``)
    without the batch carrying it: the forward agent writes it after handing the work to
    RabbitMQ, so under load a worker's later event can reach the log first.
    """
    wanted = {row["request_id"]: row for row in rows}
    seen: dict[str, dict[int, dict[str, Any]]] = {}
    began: dict[str, float] = {}
    for item in items:
        row = wanted.get(item.request_id)
        if row is None:
            continue
        if isinstance(item, InferenceRequest):
            status, at = "queued", item.created_at
        else:
            status, at = item.status, item.at
            start = at if status == "running" else item.started_at
            if start is not None:
                began[item.request_id] = min(start, began.get(item.request_id, start))
        rank = STATUS_RANK.get(status)
        if rank is not None and (row.get("prev_rank") or 0) < rank < row.get("status_rank", 0):
            seen.setdefault(item.request_id, {}).setdefault(rank, {"status": status, "at": at})
    for request_id, start in began.items():
        row = wanted[request_id]
        if (row.get("prev_rank") or 0) < _DISPATCHED < row.get("status_rank", 0):
            at = row.get("dispatched_at") or start
            seen.setdefault(request_id, {}).setdefault(
                _DISPATCHED, {"status": "dispatched", "at": at}
            )
    for request_id, ranks in seen.items():
        wanted[request_id]["passed"] = [ranks[r] for r in sorted(ranks)]


def _recordset_types() -> str:
    types = {
        "status_rank": "smallint", "estimated_tokens": "integer", "attempts": "integer",
        "input": "jsonb", "params": "jsonb", "metadata": "jsonb", "result": "jsonb",
        "error": "jsonb", "usage": "jsonb", "history": "jsonb", "webhook_events": "jsonb",
        "batch_line": "integer",
    }  # fmt: skip
    return ", ".join(
        f"{c} {'float8' if c in TIMESTAMPS else types.get(c, 'text')}" for c in UPSERT_COLUMNS
    )


_DEFAULTS = {"attempts": "0", "history": "'[]'::jsonb"}


def _select_expr(column: str) -> str:
    if column in TIMESTAMPS:
        return f"to_timestamp(b.{column})"
    if column in _DEFAULTS:
        return f"coalesce(b.{column}, {_DEFAULTS[column]})"
    return f"b.{column}"


_ADV = "requests.status_rank < EXCLUDED.status_rank"
_TERMINAL_LIST = ", ".join(f"'{s}'" for s in sorted(TERMINAL))


def _set_clause() -> str:
    sets = [f"{c} = COALESCE(requests.{c}, EXCLUDED.{c})" for c in FILL_FIELDS]
    sets += [
        f"status = CASE WHEN {_ADV} THEN EXCLUDED.status ELSE requests.status END",
        "status_rank = GREATEST(requests.status_rank, EXCLUDED.status_rank)",
    ]
    for c in ("result", "error", "usage", "completed_at", "backend"):
        sets.append(
            f"{c} = CASE WHEN {_ADV} THEN COALESCE(EXCLUDED.{c}, requests.{c}) ELSE requests.{c} END"
        )
    sets += [
        f"attempts = CASE WHEN {_ADV} THEN GREATEST(requests.attempts, EXCLUDED.attempts) ELSE requests.attempts END",
        f"updated_at = CASE WHEN {_ADV} THEN EXCLUDED.updated_at ELSE requests.updated_at END",
        # New history entries: statuses the row has not seen, and never a second terminal one.
        "history = (SELECT coalesce(jsonb_agg(e ORDER BY (e->>'at')::float8), '[]'::jsonb) FROM ("
        " SELECT h AS e FROM jsonb_array_elements(requests.history) h"
        " UNION ALL SELECT n FROM jsonb_array_elements(EXCLUDED.history) n"
        " WHERE NOT requests.history @> jsonb_build_array(jsonb_build_object('status', n->'status'))"
        f" AND NOT (requests.status_rank >= {TERMINAL_RANK} AND n->>'status' IN ({_TERMINAL_LIST}))) s)",
        "webhook_state = CASE WHEN requests.webhook_state IS NULL"
        f" AND GREATEST(requests.status_rank, EXCLUDED.status_rank) >= {TERMINAL_RANK}"
        " AND COALESCE(requests.callback_url, EXCLUDED.callback_url) IS NOT NULL"
        # Terminal statuses only when the request asked for them (NULL: it did, by default).
        " AND (COALESCE(requests.webhook_events, EXCLUDED.webhook_events) IS NULL"
        f" OR COALESCE(requests.webhook_events, EXCLUDED.webhook_events) ? (CASE WHEN {_ADV}"
        " THEN EXCLUDED.status ELSE requests.status END))"
        " THEN 'pending' ELSE requests.webhook_state END",
    ]
    return ",\n        ".join(sets)


def _where_clause() -> str:
    fills = [f"(requests.{c} IS NULL AND EXCLUDED.{c} IS NOT NULL)" for c in FILL_FIELDS]
    return " OR ".join([_ADV, *fills])


def _build_upsert_sql(report_current: bool) -> str:
    cols = UPSERT_COLUMNS
    # prev_rank: the row's rank before this statement (NULL for a new row), for passed_through.
    returned = ", ".join([*(f"up.{c}" for c in RETURNED_COLUMNS), "old.status_rank AS prev_rank"])
    # After a write whose outcome is unknown (the connection died around the commit), rows
    # already at the batch's status are reported too, so their notification is not lost.
    current = (
        f"""
   OR up.status = (SELECT b.status FROM b WHERE b.request_id = up.request_id)
UNION ALL
SELECT {", ".join(f"r.{c}" for c in RETURNED_COLUMNS)}, r.status_rank FROM requests r JOIN b USING (request_id)
WHERE r.status = b.status AND NOT EXISTS (SELECT 1 FROM up WHERE up.request_id = r.request_id)"""
        if report_current
        else ""
    )
    return f"""
WITH b AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS b({_recordset_types()})
), old AS (
    SELECT r.request_id, r.status_rank FROM requests r JOIN b USING (request_id)
), up AS (
    INSERT INTO requests ({", ".join(cols)})
    SELECT {", ".join(_select_expr(c) for c in cols)} FROM b ORDER BY b.request_id
    ON CONFLICT (request_id) DO UPDATE SET
        {_set_clause()}
    WHERE {_where_clause()}
    RETURNING requests.*
)
SELECT {returned} FROM up LEFT JOIN old USING (request_id)
WHERE old.request_id IS NULL OR old.status_rank < up.status_rank{current}
"""


UPSERT_SQL = _build_upsert_sql(report_current=False)
UPSERT_REPORT_CURRENT_SQL = _build_upsert_sql(report_current=True)
