"""The PostgreSQL store against a real PostgreSQL: migrations, keys, plans, idempotent upserts, lists."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from bridges.clients.key_events import KeyEvents
from bridges.clients.store import Store
from devtools.localbroker import free_port
from inferstream.apikeys import hash_key
from inferstream.errors import InvalidRequest, StoreUnavailable
from inferstream.ids import new_request_id
from inferstream.settings import Settings
from schemas.documents import request_doc
from schemas.migrate import migrate, migrations
from schemas.plans import DEFAULT_PLAN, KeyRecord, Plan
from schemas.records import InferenceRequest, ResultEvent
from tests.support.postgres import DSN, drop_schema, fresh_schema
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration
T0 = 1_800_000_000.0
ALL_VERSIONS = [v for v, _ in migrations()]


@pytest.fixture(scope="module")
async def store() -> AsyncIterator[Store]:
    async with fresh_schema() as (settings, applied):
        assert applied == ALL_VERSIONS
        s = Store(settings)
        yield s
        await s.close()


def request(user: str = "alice", dt: float = 0.0, **extra: Any) -> InferenceRequest:
    fields: dict[str, Any] = {
        "request_id": new_request_id(T0 + dt),
        "user_id": user,
        "task": "generate",
        "model": "sim-gpt",
        "input": ["hello world"],
        "estimated_tokens": 259,
        "created_at": T0 + dt,
        "quota_day": "2027-01-15",
        "params": {"max_tokens": 256},
        "metadata": {"ticket": 42},
    }
    fields.update(extra)
    return InferenceRequest(**fields)


def ev(req: InferenceRequest, status: str, dt: float, **extra: Any) -> ResultEvent:
    return ResultEvent.for_request(req, status, req.created_at + dt, **extra)


async def test_migrate_again_applies_nothing(store: Store) -> None:
    assert await migrate(DSN, store.pool.schema) == []
    assert await store.migrate() == []


async def test_concurrent_migrations_apply_each_file_once() -> None:
    schema = f"t{uuid.uuid4().hex[:8]}"
    try:
        results = await asyncio.gather(*(migrate(DSN, schema) for _ in range(4)))
        assert sorted(results) == [[], [], [], ALL_VERSIONS]
        conn = await asyncpg.connect(DSN)
        try:
            count = await conn.fetchval(f'SELECT count(*) FROM "{schema}".schema_migrations')
        finally:
            await conn.close()
        assert count == len(ALL_VERSIONS)
    finally:
        await drop_schema(schema)


async def test_keys_are_stored_hashed_loaded_and_revoked(store: Store) -> None:
    key = await store.keys.create_key("alice")
    assert key.startswith("isk_") and len(key) > 40
    digest = hash_key(store.settings.key_secret, key)
    assert (await store.keys.load_keys())[digest] == KeyRecord(user_id="alice", plan="default")
    pool = await store.connect()
    row = await pool.fetchrow("SELECT * FROM api_keys WHERE key_hash = $1", digest)
    assert row["key_prefix"] == key[:8] and key not in [str(v) for v in row.values()]
    assert await store.keys.revoke_key(key) is True
    assert await store.keys.revoke_key(key) is False
    assert digest not in await store.keys.load_keys()
    with pytest.raises(InvalidRequest, match="unknown plan 'gold'"):
        await store.keys.create_key("alice", plan="gold")


async def test_key_and_plan_changes_are_notified_on_commit_and_found_by_digest(store: Store) -> None:
    conn = await asyncpg.connect(DSN)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(store.keys.channel, lambda _c, _pid, _ch, payload: heard.put_nowait(payload))
    try:
        key = await store.keys.create_key("ivy")
        digest = hash_key(store.settings.key_secret, key)
        assert await asyncio.wait_for(heard.get(), 5) == f"key:{digest}"
        found = await store.keys.find_key(digest)
        assert found is not None and found[0] == KeyRecord(user_id="ivy", plan="default")
        assert found[1] == DEFAULT_PLAN
        assert await store.keys.revoke_key(key)
        assert await asyncio.wait_for(heard.get(), 5) == f"key:{digest}"
        assert await store.keys.find_key(digest) is None
        assert not await store.keys.revoke_key(key)  # nothing revoked, nothing notified
        await store.keys.set_plan("notified", 5, 5, 5)
        assert await asyncio.wait_for(heard.get(), 5) == "plan:notified"
        assert heard.empty()
        assert await store.keys.find_key(hash_key(store.settings.key_secret, "isk_never")) is None
    finally:
        await conn.close()


async def test_a_key_lookup_with_postgres_down_is_unavailable() -> None:
    down = Store(Settings(postgres_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"))
    try:
        with pytest.raises(StoreUnavailable) as info:
            await down.keys.find_key("0" * 64)
        assert info.value.retry_after == 1 and not info.value.broken_connection
    finally:
        await down.close()


async def test_key_events_reconnect_and_reload_after_the_connection_is_killed(store: Store) -> None:
    digests: list[str] = []
    connects: list[float] = []

    async def connected() -> None:
        connects.append(asyncio.get_running_loop().time())

    events = KeyEvents(
        DSN, store.keys.channel, on_key=digests.append, on_plan=lambda _n: None, on_connected=connected, ping_s=0.5
    )
    running = asyncio.ensure_future(events.run())
    try:
        await wait_for(lambda: events.connected, timeout=10, what="listener connected")
        key = await store.keys.create_key("jay")
        await wait_for(lambda: digests, timeout=5, what="the create notification")
        pool = await store.connect()
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN %' AND query LIKE $1",
            f"%{store.keys.channel}%",
        )
        assert killed >= 1
        await wait_for(lambda: len(connects) >= 2 and events.connected, timeout=15, what="reconnected")
        await store.keys.revoke_key(key)
        await wait_for(lambda: len(digests) >= 2, timeout=5, what="a notification after reconnecting")
        assert digests == [hash_key(store.settings.key_secret, key)] * 2
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_plans_default_set_and_update(store: Store) -> None:
    plans = await store.keys.load_plans()
    assert plans["default"] == DEFAULT_PLAN
    pro = await store.keys.set_plan("pro", 1000, 1_000_000, 600, "normal")
    assert pro == Plan("pro", 1000, 1_000_000, 600, "normal")
    await store.keys.set_plan("pro", 2000, 5_000_000_000, 600, "low")
    assert (await store.keys.load_plans())["pro"] == Plan("pro", 2000, 5_000_000_000, 600, "low")
    assert (await store.keys.create_key("bob", plan="pro")).startswith("isk_")
    with pytest.raises(InvalidRequest):
        await store.keys.set_plan("bad", 1, 1, 1, "urgent")


async def test_same_event_twice_is_one_row(store: Store) -> None:
    req = request()
    (first,) = await store.requests.upsert_events([req, req])
    assert first["status"] == "queued" and first["input"] == ["hello world"]
    assert await store.requests.upsert_events([req]) == []
    done = ev(req, "completed", 2, result={"text": "hi"}, usage={"total_tokens": 12}, attempts=1)
    assert [r["status"] for r in await store.requests.upsert_events([done])] == ["completed"]
    assert await store.requests.upsert_events([done]) == []
    row = await store.requests.get_request("alice", req.request_id)
    assert row is not None and row["status"] == "completed" and row["attempts"] == 1
    assert [h["status"] for h in row["history"]] == ["queued", "completed"]


async def test_out_of_order_result_first_keeps_the_request(store: Store) -> None:
    req = request(callback_url="https://hooks.example/x")
    done = ev(req, "completed", 3, result={"text": "hi"}, usage={"total_tokens": 12}, attempts=2)
    (first,) = await store.requests.upsert_events([done])
    assert first["status"] == "completed" and first["input"] is None and first["task"] == "generate"
    assert first["webhook_state"] == "pending"
    # The request and its dispatch arrive late: they fill in, they change no status, nobody is notified.
    assert await store.requests.upsert_events([ev(req, "dispatched", 1), req]) == []
    row = await store.requests.get_request("alice", req.request_id)
    assert row is not None
    assert row["status"] == "completed" and row["result"] == {"text": "hi"}
    assert row["input"] == ["hello world"] and row["metadata"] == {"ticket": 42}
    assert row["params"] == {"max_tokens": 256}
    assert row["dispatched_at"].timestamp() == pytest.approx(req.created_at + 1)
    assert row["completed_at"].timestamp() == pytest.approx(req.created_at + 3)
    assert row["updated_at"].timestamp() == pytest.approx(req.created_at + 3)
    assert [h["status"] for h in row["history"]] == ["queued", "dispatched", "completed"]
    assert request_doc(row)["completed_at"].endswith("Z")


async def test_terminal_status_never_goes_back(store: Store) -> None:
    req = request()
    await store.requests.upsert_events([req, ev(req, "completed", 3, result={"text": "ok"}, attempts=1)])
    failed = ev(req, "failed", 5, error={"type": "model_error", "message": "late"}, attempts=4)
    assert await store.requests.upsert_events([ev(req, "running", 2, attempts=3)]) == []  # delivered late
    assert await store.requests.upsert_events([failed]) == []
    row = await store.requests.get_request("alice", req.request_id)
    assert row is not None
    assert (row["status"], row["result"], row["error"], row["attempts"]) == (
        "completed",
        {"text": "ok"},
        None,
        1,
    )
    assert row["started_at"] is not None  # a late event may still fill in its own timestamp
    assert [h["status"] for h in row["history"]] == ["queued", "running", "completed"]


async def test_a_retry_reports_rows_it_may_already_have_written(store: Store) -> None:
    req = request()
    done = ev(req, "completed", 2, result={"text": "hi"})
    assert len(await store.requests.upsert_events([req, done])) == 1
    assert await store.requests.upsert_events([done]) == []
    (row,) = await store.requests.upsert_events([done, ev(req, "running", 1)], report_current=True)
    assert row["status"] == "completed" and row["result"] == {"text": "hi"}
    assert await store.requests.upsert_events([ev(req, "running", 1)], report_current=True) == []


async def test_lifecycle_batch_by_batch_returns_each_transition(store: Store) -> None:
    req = request()
    seen = []
    for item in (req, ev(req, "dispatched", 1), ev(req, "running", 2), ev(req, "cancelled", 3)):
        seen += [
            (r["status"], r["updated_at"].timestamp()) for r in await store.requests.upsert_events([item])
        ]
    assert [s for s, _ in seen] == ["queued", "dispatched", "running", "cancelled"]
    assert [t for _, t in seen] == pytest.approx([T0 + d for d in range(4)])


async def test_list_newest_first_with_status_filter_and_cursor(store: Store) -> None:
    user = f"u{uuid.uuid4().hex[:6]}"
    reqs = [request(user, dt=i) for i in range(7)]
    await store.requests.upsert_events([*reqs, *(ev(r, "completed", 1) for r in reqs[::2])])
    await store.requests.upsert_events([request("mallory", dt=3.5)])
    newest_first = [r.request_id for r in reversed(reqs)]

    page1 = await store.requests.list_requests(user, limit=3)
    page2 = await store.requests.list_requests(user, limit=3, after=page1[-1]["request_id"])
    page3 = await store.requests.list_requests(user, limit=3, after=page2[-1]["request_id"])
    assert [r["request_id"] for r in page1 + page2 + page3] == newest_first
    assert len(page3) == 1

    done = await store.requests.list_requests(user, status="completed", limit=2)
    more = await store.requests.list_requests(
        user, status="completed", limit=10, after=done[-1]["request_id"]
    )
    assert [r["request_id"] for r in done + more] == [r.request_id for r in reversed(reqs[::2])]
    assert {r["status"] for r in done + more} == {"completed"}
    assert await store.requests.list_requests(user, status="running") == []


async def test_get_is_none_for_another_users_request(store: Store) -> None:
    req = request("alice")
    await store.requests.upsert_events([req])
    assert await store.requests.get_request("alice", req.request_id) is not None
    assert await store.requests.get_request("mallory", req.request_id) is None
    assert await store.requests.get_request("alice", "req_doesnotexist") is None


async def test_dead_letters_and_redrive(store: Store) -> None:
    req = request()
    await store.requests.upsert_events(
        [req, ev(req, "failed", 2, error={"type": "model_http_500", "message": "x"})]
    )
    await store.dead_letters.record_dead_letter(
        req, {"type": "model_http_500", "message": "x"}, [{"attempt": 1}]
    )
    (dead,) = [d for d in await store.dead_letters.list_dead_letters(100) if d["request_id"] == req.request_id]
    assert InferenceRequest.from_data(dead["payload"]) == req and dead["redrive_count"] == 0
    assert await store.dead_letters.mark_redriven(req.request_id) is True
    assert await store.dead_letters.mark_redriven("req_unknown") is False
    assert req.request_id not in [
        d["request_id"] for d in await store.dead_letters.list_dead_letters(100, pending_only=True)
    ]
    after = await store.dead_letters.get_dead_letter(req.request_id)
    assert after is not None and after["redrive_count"] == 1 and after["redriven_at"] is not None
    row = await store.requests.get_request("alice", req.request_id)
    assert row is not None and row["history"][-1]["status"] == "redriven"


async def test_webhook_delivery_state(store: Store) -> None:
    req = request(callback_url="https://hooks.example/y")
    await store.requests.upsert_events([req, ev(req, "completed", 1, result={"text": "hi"})])
    pending = [r["request_id"] for r in await store.webhooks.pending_webhooks(1000)]
    assert req.request_id in pending
    await store.webhooks.record_webhook_attempt(req.request_id, delivered=False, error="HTTP 500")
    await store.webhooks.record_webhook_attempt(req.request_id, delivered=True)
    pool = await store.connect()
    row = await pool.fetchrow("SELECT * FROM requests WHERE request_id = $1", req.request_id)
    assert (row["webhook_state"], row["webhook_attempts"], row["webhook_last_error"]) == (
        "delivered",
        2,
        None,
    )
    assert req.request_id not in [r["request_id"] for r in await store.webhooks.pending_webhooks(1000)]


async def test_reads_survive_a_killed_connection(store: Store) -> None:
    one = Store(store.settings, min_size=1, max_size=1)
    try:
        req = request()
        await one.requests.upsert_events([req])
        pool = await one.connect()
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(DSN)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        row = await one.requests.get_request("alice", req.request_id)
        assert row is not None and row["status"] == "queued"
    finally:
        await one.close()
