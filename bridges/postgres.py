"""The PostgreSQL store: API keys, plans, request rows, dead letters and webhook delivery state.

One asyncpg pool per process, opened lazily under a lock on first use (or by
``connect()``), with ``search_path`` set to the namespace's schema so every
statement is schema-unqualified. JSON columns are encoded and decoded with
orjson, so rows come back with plain Python objects in them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from bridges.postgres_rows import UPSERT_REPORT_CURRENT_SQL, UPSERT_SQL, Event, collapse
from inferstream import clock
from inferstream.apikeys import hash_key
from inferstream.errors import InvalidRequest, Unavailable
from inferstream.settings import PRIORITIES, Settings
from schemas.documents import REQUEST_COLUMNS
from schemas.migrate import migrate, quote_ident
from schemas.plans import KeyRecord, Plan
from schemas.records import InferenceRequest

log = logging.getLogger(__name__)

KEY_PREFIX = "isk_"
_ROW = ", ".join(REQUEST_COLUMNS)
MAX_LIST_LIMIT = 1000


# PostgreSQL unreachable, restarting, overloaded, or the pool's connection gone.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError (connect, command_timeout) is one too
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.DeadlockDetectedError,  # a concurrent replay locked rows in another order
    asyncpg.SerializationError,
    asyncpg.InterfaceError,  # connection closed mid-query, pool closing or closed
    # Seen when the server ends an idle pooled connection (restart, pg_terminate_backend) and a
    # query races the close: the connection is unusable, a fresh pool works.
    asyncpg.exceptions._base.InternalClientError,
)
# Errors after which the pool's connection, or the pool itself, is not worth keeping.
BROKEN_CONNECTION: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
)
# InterfaceError subclasses that are our mistakes, not the database's state.
PERMANENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions._base.DataError,  # a parameter that cannot be encoded
    asyncpg.exceptions._base.ClientConfigurationError,
    asyncpg.exceptions._base.UnsupportedClientFeatureError,
    asyncpg.exceptions._base.UnsupportedServerFeatureError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt later may succeed: PostgreSQL down, restarting or overloaded."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, PERMANENT)


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + orjson.dumps(value)  # jsonb binary format: version byte, then JSON text


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=_jsonb_encode, decoder=_jsonb_decode, format="binary"
    )
    await conn.set_type_codec(
        "json",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
    )


class Store:
    """PostgreSQL, the system of record.

    Usable before ``connect()`` (the pool opens on first use); after ``close()``
    a further call opens a new pool, so stop the users of the store first.
    """

    def __init__(
        self, settings: Settings, *, dsn: str | None = None, min_size: int = 1, max_size: int = 10
    ) -> None:
        self.settings = settings
        self.dsn = dsn or settings.postgres_dsn
        self.schema = settings.db_schema
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle -----------------------------------------------------
    async def connect(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is not None and not pool.is_closing():
            return pool
        async with self._lock:
            if self._pool is None or self._pool.is_closing():
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=self._min_size,
                    max_size=self._max_size,
                    command_timeout=60,
                    server_settings={"search_path": quote_ident(self.schema)},
                    init=_init_connection,
                )
            return self._pool

    async def reset(self) -> None:
        """Drop a pool that may be broken; the next call opens a fresh one (with ``self.dsn``)."""
        async with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def close(self) -> None:
        async with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def migrate(self) -> list[str]:
        return await migrate(self.dsn, self.schema)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        # Reads are idempotent, so they retry once: after a PostgreSQL restart the first query on
        # each pooled connection fails, and the second gets a fresh connection.
        for attempt in (1, 2):
            pool = await self.connect()
            try:
                return await pool.fetch(sql, *args)
            except TRANSIENT as exc:
                if attempt == 2 or not is_transient(exc):
                    raise
                log.info("PostgreSQL read failed (%s: %s); retrying once", type(exc).__name__, exc)
        raise AssertionError("unreachable")

    async def _fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self._fetch(sql, *args)
        return dict(rows[0]) if rows else None

    # ---- keys and plans ------------------------------------------------
    async def create_key(self, user_id: str, plan: str = "default") -> str:
        """A new key for ``user_id``; the key is returned once and only its HMAC is stored."""
        pool = await self.connect()
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            # The notification (sent at commit) drops a cached "unknown" answer for the digest.
            await pool.execute(
                "WITH k AS (INSERT INTO api_keys (key_hash, key_prefix, user_id, plan) VALUES ($1, $2, $3, $4)"
                " RETURNING key_hash) SELECT pg_notify($5, 'key:' || key_hash) FROM k",
                hash_key(self.settings.key_secret, key),
                key[:8],
                user_id,
                plan,
                self.keys_channel,
            )
        except asyncpg.ForeignKeyViolationError:
            known = sorted(await self.load_plans())
            raise InvalidRequest(
                f"unknown plan {plan!r}; known plans: {', '.join(known)}"
            ) from None
        return key

    async def revoke_key(self, key: str) -> bool:
        """True if an active key was revoked."""
        pool = await self.connect()
        # One statement: the revocation and its notification commit together (workers drop the
        # digest on the notification; none can miss a committed revocation while listening).
        revoked = await pool.fetch(
            "WITH r AS (UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1 AND revoked_at IS NULL"
            " RETURNING key_hash) SELECT pg_notify($2, 'key:' || key_hash) FROM r",
            hash_key(self.settings.key_secret, key),
            self.keys_channel,
        )
        return len(revoked) == 1

    @property
    def keys_channel(self) -> str:
        """The LISTEN/NOTIFY channel of key and plan changes: ``key:<digest>`` or ``plan:<name>``."""
        return f"{self.schema}_keys"

    async def find_key(self, digest: str) -> tuple[KeyRecord, Plan | None] | None:
        """The active key with this digest and its plan's row, for a cache miss; Unavailable if PostgreSQL is down."""
        try:
            row = await self._fetchrow(
                "SELECT k.user_id, k.plan AS key_plan, p.* FROM api_keys k LEFT JOIN plans p ON p.name = k.plan"
                " WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
                digest,
            )
        except TRANSIENT as exc:
            if not is_transient(exc):
                raise
            raise Unavailable("API key cannot be checked right now (PostgreSQL is unavailable)", retry_after=1) from exc
        if row is None:
            return None
        return KeyRecord(user_id=row["user_id"], plan=row["key_plan"]), (_plan(row) if row["name"] else None)

    async def load_keys(self) -> dict[str, KeyRecord]:
        """Active keys by hash."""
        rows = await self._fetch(
            "SELECT key_hash, user_id, plan FROM api_keys WHERE revoked_at IS NULL"
        )
        return {r["key_hash"]: KeyRecord(user_id=r["user_id"], plan=r["plan"]) for r in rows}

    async def set_plan(
        self,
        name: str,
        requests_per_day: int,
        tokens_per_day: int,
        requests_per_minute: int,
        max_priority: str = "high",
    ) -> Plan:
        if max_priority not in PRIORITIES:
            raise InvalidRequest(
                f"max_priority must be one of {', '.join(PRIORITIES)}, not {max_priority!r}"
            )
        if min(requests_per_day, tokens_per_day, requests_per_minute) < 0:
            raise InvalidRequest("plan limits must not be negative")
        pool = await self.connect()
        row = await pool.fetchrow(
            "WITH p AS (INSERT INTO plans (name, requests_per_day, tokens_per_day, requests_per_minute, max_priority)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET"
            " requests_per_day = EXCLUDED.requests_per_day, tokens_per_day = EXCLUDED.tokens_per_day,"
            " requests_per_minute = EXCLUDED.requests_per_minute, max_priority = EXCLUDED.max_priority,"
            " updated_at = now() RETURNING *) SELECT p.*, pg_notify($6, 'plan:' || p.name) FROM p",
            name,
            requests_per_day,
            tokens_per_day,
            requests_per_minute,
            max_priority,
            self.keys_channel,
        )
        return _plan(row)

    async def load_plans(self) -> dict[str, Plan]:
        return {r["name"]: _plan(r) for r in await self._fetch("SELECT * FROM plans")}

    # ---- requests ------------------------------------------------------
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
        pool = await self.connect()
        sql = UPSERT_REPORT_CURRENT_SQL if report_current else UPSERT_SQL
        return [dict(r) for r in await pool.fetch(sql, rows)]

    async def get_request(self, user_id: str, request_id: str) -> dict[str, Any] | None:
        """The row, or None when it does not exist or belongs to another user."""
        return await self._fetchrow(
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
            f" ORDER BY request_id DESC LIMIT {max(1, min(int(limit), MAX_LIST_LIMIT))}"
        )
        return [dict(r) for r in await self._fetch(sql, *args)]

    # ---- dead letters --------------------------------------------------
    async def record_dead_letter(
        self,
        request: InferenceRequest,
        error: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Keep a request that exhausted its attempts; a second death re-opens it for redrive."""
        pool = await self.connect()
        await pool.execute(
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
        rows = await self._fetch(
            f"SELECT * FROM dead_letters {where} ORDER BY created_at DESC, request_id LIMIT $1",
            max(1, min(int(limit), MAX_LIST_LIMIT)),
        )
        return [dict(r) for r in rows]

    async def get_dead_letter(self, request_id: str) -> dict[str, Any] | None:
        return await self._fetchrow("SELECT * FROM dead_letters WHERE request_id = $1", request_id)

    async def mark_redriven(self, request_id: str, new_request_id: str | None = None) -> bool:
        """Record a re-submission on the dead letter and in the request row's history."""
        pool = await self.connect()
        entry: list[dict[str, Any]] = [{"status": "redriven", "at": clock.now()}]
        if new_request_id is not None:
            entry[0]["request_id"] = new_request_id
        async with pool.acquire() as conn, conn.transaction():
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

    async def stalled_queued(self, older_than_s: float, limit: int = 500) -> list[dict[str, Any]]:
        """Rows still ``queued`` ``older_than_s`` after their last change, oldest first (the watchdog's)."""
        rows = await self._fetch(
            f"SELECT {_ROW} FROM requests WHERE status = 'queued'"
            " AND updated_at < now() - make_interval(secs => $2) ORDER BY updated_at LIMIT $1",
            max(1, min(int(limit), MAX_LIST_LIMIT)),
            float(older_than_s),
        )
        return [dict(r) for r in rows]

    # ---- webhooks ------------------------------------------------------
    async def pending_webhooks(self, limit: int = 100, *, older_than_s: float = 0.0) -> list[dict[str, Any]]:
        """Terminal rows with a callback whose delivery is still due, oldest first.

        ``older_than_s`` skips rows that reached their status more recently (their
        delivery is probably still being retried by the worker that sank them).
        """
        rows = await self._fetch(
            f"SELECT {_ROW}, webhook_attempts FROM requests WHERE webhook_state = 'pending'"
            " AND ($2 = 0 OR updated_at < now() - make_interval(secs => $2))"
            " ORDER BY updated_at LIMIT $1",
            max(1, min(int(limit), MAX_LIST_LIMIT)),
            float(older_than_s),
        )
        return [dict(r) for r in rows]

    async def record_webhook_attempt(
        self, request_id: str, *, delivered: bool, error: str | None = None, final: bool = False
    ) -> None:
        """One delivery attempt: delivered, or failed (``final`` gives up and marks it failed)."""
        pool = await self.connect()
        await pool.execute(
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


def _plan(row: Mapping[str, Any]) -> Plan:
    return Plan(
        name=row["name"],
        requests_per_day=row["requests_per_day"],
        tokens_per_day=row["tokens_per_day"],
        requests_per_minute=row["requests_per_minute"],
        max_priority=row["max_priority"],
        updated_at=row["updated_at"].timestamp(),
    )
