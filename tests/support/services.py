"""Stopping and starting the machine's PostgreSQL for fault tests, safely.

``pg_ctlcluster start`` leaves the server running with whatever stdout it was
given; if that is a pipe we read to EOF, the read never ends (the server holds
the pipe). The command's output goes to a temporary file instead, and each
call has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

import asyncpg

from tests.support.wait import wait_for


def has_local_cluster() -> bool:
    return os.path.isdir("/etc/postgresql")


async def pg_ctl(action: str, timeout: float = 60.0) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    with tempfile.TemporaryFile() as out:
        proc = await asyncio.create_subprocess_exec(
            "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        await asyncio.wait_for(proc.wait(), timeout)
        out.seek(0)
        assert proc.returncode == 0, f"pg_ctlcluster {action} failed: {out.read().decode(errors='replace')}"


async def postgres_up(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


@contextlib.asynccontextmanager
async def postgres_stopped(dsn: str) -> AsyncIterator[None]:
    """PostgreSQL is down inside the block, and always up again after it."""
    await pg_ctl("stop")
    try:
        yield
    finally:
        if not await postgres_up(dsn):
            await pg_ctl("start")
        await wait_for(lambda: postgres_up(dsn), timeout=60, interval=0.2, what="PostgreSQL back up")
