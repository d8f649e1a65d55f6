"""A fresh, migrated PostgreSQL schema per test module (or test), dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from bridges.clients.store import Store
from inferstream.settings import Settings
from schemas.migrate import migrate

DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[tuple[Settings, list[str]]]:
    """Settings naming a new schema with every migration applied, and the versions applied."""
    schema = f"t{uuid.uuid4().hex[:8]}"
    try:
        applied = await migrate(DSN, schema)
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
    try:
        yield Settings(namespace=schema, postgres_dsn=DSN), applied
    finally:
        await drop_schema(schema)


@asynccontextmanager
async def fresh_store() -> AsyncIterator[Store]:
    """A :class:`Store` over a fresh schema (see :func:`fresh_schema`), closed afterwards."""
    async with fresh_schema() as (settings, _):
        store = Store(settings)
        try:
            yield store
        finally:
            await store.close()
