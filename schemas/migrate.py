"""Applies the numbered SQL migrations of ``schemas/migrations`` to one namespace's schema.

Each namespace lives in its own PostgreSQL schema. The SQL files are written
schema-unqualified and run with ``SET LOCAL search_path`` to that schema, one
transaction per file, recorded in ``{schema}.schema_migrations``. An advisory
transaction lock per schema serialises concurrent runs (several workers
starting at once), so running it twice or in parallel applies each file once.
"""

from __future__ import annotations

import hashlib
import logging
import re
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, quoted; schema names come from settings, not from clients."""
    return '"' + name.replace('"', '""') + '"'


def migrations() -> list[tuple[str, str]]:
    """``(version, sql)`` of every packaged migration, in order."""
    found: list[tuple[str, str]] = []
    for entry in resources.files("schemas").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((match.group(1), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _lock_key(schema: str) -> int:
    # A stable signed 64-bit key per schema: Python's hash() is salted per process.
    digest = hashlib.sha256(f"inferstream.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(dsn: str, schema: str) -> list[str]:
    """Create ``schema`` if missing and apply pending migrations; returns the versions applied."""
    ident = quote_ident(schema)
    lock = _lock_key(schema)
    applied: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {ident}.schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for version, sql in migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                done = await conn.fetchval(
                    f"SELECT 1 FROM {ident}.schema_migrations WHERE version = $1", version
                )
                if done:
                    continue
                await conn.execute(f"SET LOCAL search_path TO {ident}")
                await conn.execute(sql)  # no arguments: simple protocol, several statements
                await conn.execute(
                    f"INSERT INTO {ident}.schema_migrations (version) VALUES ($1)", version
                )
            log.info("migration %s applied to schema %s", version, schema)
            applied.append(version)
    finally:
        await conn.close()
    return applied
