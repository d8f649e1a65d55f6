"""The one asyncpg pool the aggregates share: lifecycle, JSON codecs, and driver errors turned into StoreUnavailable.

The pool opens lazily under a lock on first use (or by ``connect()``), with
``search_path`` set to the namespace's schema so every statement is
schema-unqualified. JSON columns are encoded and decoded with orjson, so rows
come back with plain Python objects in them. Every statement runs inside
:func:`translated`: PostgreSQL being down, restarting or overloaded leaves this
module as :class:`~inferstream.errors.StoreUnavailable` and nothing else; other
driver errors (a bug, a missing table) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson

from inferstream.errors import StoreUnavailable
from inferstream.settings import Settings
from schemas.migrate import migrate, quote_ident

log = logging.getLogger(__name__)

MAX_LIST_LIMIT = 1000

# PostgreSQL unreachable, restarting, overloaded, or the pool's connection gone.
_TRANSIENT: tuple[type[BaseException], ...] = (
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
_BROKEN_CONNECTION: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,
)
# InterfaceError subclasses that are our mistakes, not the database's state.
_PERMANENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions._base.DataError,  # a parameter that cannot be encoded
    asyncpg.exceptions._base.ClientConfigurationError,
    asyncpg.exceptions._base.UnsupportedClientFeatureError,
    asyncpg.exceptions._base.UnsupportedServerFeatureError,
)


def unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable a driver error means, or None when another attempt would fail the same way."""
    if not isinstance(exc, _TRANSIENT) or isinstance(exc, _PERMANENT):
        return None
    return StoreUnavailable(
        f"{type(exc).__name__}: {exc}", broken_connection=isinstance(exc, _BROKEN_CONNECTION)
    )


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise StoreUnavailable for a transient driver error inside the block; other errors pass."""
    try:
        yield
    except _TRANSIENT as exc:
        down = unavailable(exc)
        if down is None:
            raise
        raise down from exc


def limit_of(limit: int) -> int:
    """A page size clamped to 1..MAX_LIST_LIMIT."""
    return max(1, min(int(limit), MAX_LIST_LIMIT))


# An escaped U+0000 in JSON text (not an escaped backslash followed by "u0000").
_ESCAPED_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def _jsonb_encode(value: Any) -> bytes:
    data = orjson.dumps(value)
    if b"\\u0000" in data:
        # jsonb cannot hold U+0000 and one such string fails the whole batch statement (the sink
        # would retry it for ever). Clients are refused at submit; this covers what a model returns.
        data = _ESCAPED_NUL.sub(rb"\1\\ufffd", data)
    return b"\x01" + data  # jsonb binary format: version byte, then JSON text


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


class Pool:
    """The shared pool. Usable before ``connect()``; after ``close()`` a further call opens a new pool."""

    def __init__(
        self, settings: Settings, *, dsn: str | None = None, min_size: int = 1, max_size: int = 10
    ) -> None:
        self.dsn = dsn or settings.postgres_dsn
        self.schema = settings.db_schema
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> asyncpg.Pool:
        pool = self._pool
        if pool is not None and not pool.is_closing():
            return pool
        async with self._lock:
            if self._pool is None or self._pool.is_closing():
                with translated():
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
            with translated():
                await pool.close()

    async def migrate(self) -> list[str]:
        with translated():
            return await migrate(self.dsn, self.schema)

    async def read(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows of an idempotent query, retried once: after a PostgreSQL restart the first query on
        each pooled connection fails, and the second gets a fresh connection."""
        try:
            return await self.write(sql, *args)
        except StoreUnavailable as exc:
            log.info("PostgreSQL read failed (%s); retrying once", exc.reason)
        return await self.write(sql, *args)

    async def read_one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.read(sql, *args)
        return rows[0] if rows else None

    async def write(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows a statement returns, in one attempt (a write that failed may have committed)."""
        pool = await self.connect()
        with translated():
            return [dict(r) for r in await pool.fetch(sql, *args)]

    async def execute(self, sql: str, *args: Any) -> str:
        """One statement in one attempt; returns its status tag (``UPDATE 1``)."""
        pool = await self.connect()
        with translated():
            status: str = await pool.execute(sql, *args)
            return status

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection inside one transaction, committed when the block ends."""
        pool = await self.connect()
        with translated():
            async with pool.acquire() as conn, conn.transaction():
                yield conn


class Aggregate:
    """One aggregate's statements over the shared pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def reset(self) -> None:
        """Drop the shared pool after a broken connection (``StoreUnavailable.broken_connection``)."""
        await self.pool.reset()
