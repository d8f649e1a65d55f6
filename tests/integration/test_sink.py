"""The PostgreSQL sink against a real PostgreSQL: unreachable at first, connections killed, a real restart."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from bridges.clients.store import Store
from bridges.clients.store.rows import Event
from bridges.sink import ResultSink
from devtools.localbroker import free_port as closed_port
from inferstream.ids import new_request_id
from inferstream.settings import Settings
from schemas.records import InferenceRequest, ResultEvent
from tests.support.postgres import DSN, fresh_schema
from tests.support.services import pg_ctl, postgres_up
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
async def settings() -> AsyncIterator[Settings]:
    async with fresh_schema() as (fresh, _):
        yield fresh


def lifecycle(n: int, user: str = "alice") -> tuple[list[InferenceRequest], list[ResultEvent]]:
    reqs = [
        InferenceRequest(
            request_id=new_request_id(T0 + i / 1000),
            user_id=user,
            task="embed",
            model="all-MiniLM-L6-v2",
            input=[f"text {i}"],
            estimated_tokens=4,
            created_at=T0 + i / 1000,
            quota_day="2027-01-15",
        )
        for i in range(n)
    ]
    done = [
        ResultEvent.for_request(
            r, "completed", r.created_at + 1, result={"embeddings": [[0.5]]}, attempts=1
        )
        for r in reqs
    ]
    return reqs, done


class Collector:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def __call__(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)


async def assert_all_completed(settings: Settings, reqs: Sequence[InferenceRequest]) -> None:
    conn = await asyncpg.connect(DSN, server_settings={"search_path": settings.db_schema})
    try:
        await conn.set_type_codec(
            "jsonb", schema="pg_catalog", encoder=json.dumps, decoder=json.loads
        )
        rows = await conn.fetch(
            "SELECT request_id, status, input, history FROM requests WHERE request_id = ANY($1)",
            [r.request_id for r in reqs],
        )
    finally:
        await conn.close()
    assert len(rows) == len(reqs)
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["input"] is not None for r in rows)
    assert all([h["status"] for h in r["history"]] == ["queued", "completed"] for r in rows)


async def test_write_waits_for_an_unreachable_postgres(settings: Settings) -> None:
    store = Store(settings, dsn=f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres")
    collector = Collector()
    sink = ResultSink(settings, store.requests, collector, retry_base_s=0.01, retry_max_s=0.05)
    reqs, done = lifecycle(200)
    batch: list[Event] = [*reqs, *done]
    task = asyncio.create_task(sink.write(batch))
    try:
        await wait_for(lambda: sink.failures >= 3, timeout=10, what="three failed attempts")
        assert not task.done()
        store.pool.dsn = DSN  # PostgreSQL "comes back"
        await asyncio.wait_for(task, 10)
    finally:
        await sink.stop()
        await store.close()
    assert sink.batches_written == 1 and sink.rows_changed == 200
    assert sorted(r["request_id"] for r in collector.rows) == sorted(r.request_id for r in reqs)
    await assert_all_completed(settings, reqs)


async def test_a_nul_in_model_output_does_not_wedge_the_batch(settings: Settings) -> None:
    """PostgreSQL's jsonb refuses U+0000; one such result used to fail its whole batch for ever."""
    reqs, done = lifecycle(3)
    poisoned = ResultEvent.for_request(
        reqs[1], "completed", reqs[1].created_at + 1, result={"text": "bad\x00byte"}, attempts=1
    )
    store = Store(settings)
    try:
        await ResultSink(settings, store.requests).write([*reqs, done[0], poisoned, done[2]])
        row = await store.requests.get_request(reqs[1].user_id, reqs[1].request_id)
    finally:
        await store.close()
    assert row is not None and row["status"] == "completed"
    assert row["result"] == {"text": "bad\ufffdbyte"}
    await assert_all_completed(settings, reqs)


async def test_a_batch_replayed_after_a_crash_still_reaches_the_cache(settings: Settings) -> None:
    """kill -9 between the PostgreSQL commit and the Redis write: the restarted worker re-reads the batch.

    Its rows are already applied, so an upsert that reports only changed rows
    reported nothing and the cache kept the ``queued`` document it got at
    admission: GET (Redis first) showed ``queued`` for the cache's TTL, and SSE
    never sent the terminal event (seen in the crash matrix as requests
    "stranded" in ``queued``).
    """
    reqs, done = lifecycle(16)
    store = Store(settings)
    try:
        # The worker that crashed: rows committed, its on_applied never ran.
        await ResultSink(settings, store.requests, None).write([*reqs, *done])
        collector = Collector()
        # The restarted worker replays the uncommitted offsets: the same events.
        replayed = ResultSink(settings, store.requests, collector)
        await replayed.write([*reqs, *done])
        assert replayed.rows_changed == 0  # reported for the cache, but nothing changed
    finally:
        await store.close()
    assert sorted(r["request_id"] for r in collector.rows) == sorted(r.request_id for r in reqs)
    assert {r["status"] for r in collector.rows} == {"completed"}


async def test_killed_connections_and_a_closed_pool_are_replaced(settings: Settings) -> None:
    store = Store(settings, min_size=1, max_size=1)
    sink = ResultSink(settings, store.requests, retry_base_s=0.01, retry_max_s=0.05)
    reqs, done = lifecycle(50)
    try:
        await sink.write(reqs[:25])
        pool = await store.connect()
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(DSN)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        await sink.write(reqs[25:])
        await pool.close()  # someone closed the pool under us
        await sink.write(done)
    finally:
        await store.close()
    await assert_all_completed(settings, reqs)


async def test_a_missing_table_is_raised_not_retried(settings: Settings) -> None:
    store = Store(
        Settings(namespace=f"t{uuid.uuid4().hex[:8]}", postgres_dsn=DSN)
    )  # never migrated
    sink = ResultSink(settings, store.requests, retry_base_s=0.01, retry_max_s=0.05)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await sink.write(lifecycle(1)[0])
    finally:
        await store.close()
    assert sink.failures == 0


@pytest.mark.integration
@pytest.mark.skipif(
    not os.path.isdir("/etc/postgresql"), reason="needs a local pg_ctlcluster PostgreSQL"
)
async def test_postgres_restart_mid_load_loses_nothing(settings: Settings) -> None:
    store = Store(settings, max_size=2)
    collector = Collector()
    sink = ResultSink(settings, store.requests, collector, retry_base_s=0.05, retry_max_s=0.5)
    reqs, done = lifecycle(2000)
    # Each batch admits 50 new requests and completes the previous 50, like the live stream.
    batches: list[list[Event]] = []
    for i in range(0, len(reqs) + 50, 50):
        batches.append([*reqs[i : i + 50], *done[max(0, i - 50) : i]])
    written = 0

    async def load() -> None:
        nonlocal written
        for batch in batches:
            await sink.write(batch)
            written += 1

    task = asyncio.create_task(load())
    try:
        await wait_for(lambda: written >= 5, timeout=30, what="the first batches")
        await pg_ctl("stop")
        await wait_for(
            lambda: sink.failures >= 3, timeout=30, what="the sink to notice PostgreSQL is down"
        )
        assert not task.done()
    finally:
        await pg_ctl("start")
        await wait_for(
            lambda: postgres_up(DSN), timeout=60, interval=0.1, what="PostgreSQL back up"
        )
    try:
        await asyncio.wait_for(task, 60)
    finally:
        await sink.stop()
        await store.close()
    assert written == len(batches)
    await assert_all_completed(settings, reqs)
    # Every completion was announced, even one whose commit the sink never heard back about.
    completed = {r["request_id"] for r in collector.rows if r["status"] == "completed"}
    assert completed == {r.request_id for r in reqs}
