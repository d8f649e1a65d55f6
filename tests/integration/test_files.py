"""Files and batches in a real PostgreSQL (the aggregates), and the ``/v1/files`` views over a real aiohttp server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from bridges.clients.store import Store
from inferstream.ids import batch_line_id, new_batch_id, new_file_id
from inferstream.settings import Settings
from schemas.migrate import migrate
from schemas.records import InferenceRequest, ResultEvent

pytestmark = pytest.mark.integration
DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
T0 = 1_800_000_000.0


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def store() -> AsyncIterator[Store]:
    schema = f"t{uuid.uuid4().hex[:8]}"
    try:
        await migrate(DSN, schema)
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {DSN}: {exc}")
    s = Store(Settings(namespace=schema, postgres_dsn=DSN))
    yield s
    await s.close()
    await drop_schema(schema)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def batch_doc(
    user: str, input_file_id: str, status: str = "in_progress", **extra: Any
) -> dict[str, Any]:
    batch_id = new_batch_id()
    return {
        "id": batch_id,
        "object": "batch",
        "user_id": user,
        "endpoint": "/v1/embeddings",
        "input_file_id": input_file_id,
        "completion_window": "24h",
        "status": status,
        "created_at": int(time.time()),
        **extra,
    }


# ---- Files ----------------------------------------------------------------------------------


async def test_an_upload_is_invisible_until_finished_then_reads_back_in_order(store: Store) -> None:
    file_id = new_file_id()
    await store.files.create(file_id, "alice", "batch", "in.jsonl")
    await store.files.put_part(file_id, 0, b"first ")
    assert await store.files.get("alice", file_id) is None
    assert await store.files.list("alice") == [] or all(
        f["file_id"] != file_id for f in await store.files.list("alice")
    )
    await store.files.put_part(file_id, 2, b"third")
    await store.files.put_part(file_id, 1, b"second ")
    row = await store.files.finish(file_id, 18, 1)
    assert (row["file_id"], row["bytes"], row["lines"], row["filename"]) == (
        file_id,
        18,
        1,
        "in.jsonl",
    )
    assert await store.files.get("alice", file_id) == row
    assert await collect(store.files.content("alice", file_id)) == b"first second third"
    assert await store.files.read_all(file_id) == b"first second third"


async def test_another_users_file_is_absent_to_them(store: Store) -> None:
    file_id = new_file_id()
    await store.files.put(file_id, "alice", "batch", "a.jsonl", b"{}\n", 1)
    assert await store.files.get("bob", file_id) is None
    assert await collect(store.files.content("bob", file_id)) == b""
    assert await store.files.delete("bob", file_id) is False
    assert await store.files.get("alice", file_id) is not None


async def test_put_replaces_an_earlier_file_of_that_id(store: Store) -> None:
    file_id = new_file_id()
    big = (
        bytes(range(256)) * 20_000
    )  # two parts of 4 MiB would be too slow here; the split is tested below
    await store.files.put(file_id, "alice", "batch_output", "out.jsonl", big, 7)
    row = await store.files.put(file_id, "alice", "batch_output", "out.jsonl", b"short\n", 1)
    assert (row["bytes"], row["lines"]) == (6, 1)
    assert await store.files.read_all(file_id) == b"short\n"


async def test_put_splits_a_large_file_into_parts(store: Store) -> None:
    from bridges.clients.store.files import PART_BYTES

    file_id = new_file_id()
    content = (b"x" * 1000 + b"\n") * (PART_BYTES // 1001 + 10)  # a little over one part
    await store.files.put(file_id, "alice", "batch_output", "out.jsonl", content, 0)
    parts = await store.pool.read(
        "SELECT part, length(data) AS n FROM file_parts WHERE file_id = $1 ORDER BY part", file_id
    )
    assert [p["part"] for p in parts] == [0, 1] and parts[0]["n"] == PART_BYTES
    assert await collect(store.files.content("alice", file_id)) == content


async def test_list_newest_first_by_purpose_with_a_cursor(store: Store) -> None:
    user = f"u{uuid.uuid4().hex[:6]}"
    ids = [new_file_id(T0 + i) for i in range(4)]
    for i, file_id in enumerate(ids):
        await store.files.put(
            file_id, user, "batch" if i % 2 == 0 else "batch_output", f"{i}.jsonl", b"x\n", 1
        )
    listed = [f["file_id"] for f in await store.files.list(user)]
    assert listed == ids[::-1]
    assert [f["file_id"] for f in await store.files.list(user, purpose="batch")] == [ids[2], ids[0]]
    page = await store.files.list(user, limit=2)
    rest = await store.files.list(user, limit=2, after=page[-1]["file_id"])
    assert [f["file_id"] for f in page + rest] == ids[::-1]


async def test_delete_is_hard_unless_a_batch_still_reads_the_file(store: Store) -> None:
    free, busy = new_file_id(), new_file_id()
    for file_id in (free, busy):
        await store.files.put(file_id, "alice", "batch", "in.jsonl", b"line\n", 1)
    doc = batch_doc("alice", busy)
    await store.batches.insert(doc)

    assert await store.files.delete("alice", free) is True
    assert await store.pool.read("SELECT 1 FROM files WHERE file_id = $1", free) == []
    assert await store.pool.read("SELECT 1 FROM file_parts WHERE file_id = $1", free) == []

    assert await store.files.delete("alice", busy) is True
    assert await store.files.get("alice", busy) is None  # gone to its owner
    assert await store.files.delete("alice", busy) is False
    assert await store.files.read_all(busy) == b"line\n"  # the batch still reads it
    await store.batches.update({**doc, "status": "completed"})
    await store.files.purge_if_deleted(busy)
    assert await store.pool.read("SELECT 1 FROM files WHERE file_id = $1", busy) == []


async def test_a_final_batch_does_not_keep_its_input(store: Store) -> None:
    file_id = new_file_id()
    await store.files.put(file_id, "alice", "batch", "in.jsonl", b"line\n", 1)
    await store.batches.insert(batch_doc("alice", file_id, status="completed"))
    assert await store.files.delete("alice", file_id) is True
    assert await store.pool.read("SELECT 1 FROM files WHERE file_id = $1", file_id) == []


async def test_purge_if_deleted_keeps_a_file_not_deleted(store: Store) -> None:
    file_id = new_file_id()
    await store.files.put(file_id, "alice", "batch", "in.jsonl", b"line\n", 1)
    await store.files.purge_if_deleted(file_id)
    assert await store.files.get("alice", file_id) is not None


async def test_discard_removes_an_upload_and_its_parts(store: Store) -> None:
    file_id = new_file_id()
    await store.files.create(file_id, "alice", "batch", "in.jsonl")
    await store.files.put_part(file_id, 0, b"abc")
    await store.files.discard(file_id)
    assert await store.pool.read("SELECT 1 FROM file_parts WHERE file_id = $1", file_id) == []
    assert await store.pool.read("SELECT 1 FROM files WHERE file_id = $1", file_id) == []


async def test_an_abandoned_upload_is_purged_by_a_later_one(store: Store) -> None:
    old = new_file_id()
    await store.files.create(old, "alice", "batch", "in.jsonl")
    await store.files.put_part(old, 0, b"abc")
    await store.pool.execute(
        "UPDATE files SET created_at = now() - interval '7 hours' WHERE file_id = $1", old
    )
    await store.files.create(new_file_id(), "alice", "batch", "next.jsonl")
    assert await store.pool.read("SELECT 1 FROM files WHERE file_id = $1", old) == []


# ---- Batches --------------------------------------------------------------------------------


async def test_batch_insert_is_idempotent_and_owner_only(store: Store) -> None:
    doc = batch_doc("alice", new_file_id(), metadata={"k": "v"})
    await store.batches.insert(doc)
    await store.batches.insert({**doc, "status": "failed"})
    assert await store.batches.get("alice", doc["id"]) == doc
    assert await store.batches.get("bob", doc["id"]) is None


async def test_batch_update_never_leaves_a_final_status(store: Store) -> None:
    doc = batch_doc("alice", new_file_id())
    await store.batches.insert(doc)
    await store.batches.update({**doc, "status": "finalizing"})
    done = {**doc, "status": "completed", "output_file_id": "file-x"}
    await store.batches.update(done)
    await store.batches.update({**doc, "status": "in_progress"})  # a stale write replayed
    assert await store.batches.get("alice", doc["id"]) == done
    again = {**done, "completed_at": 5}
    await store.batches.update(again)  # the finalizer retried
    assert await store.batches.get("alice", doc["id"]) == again


async def test_batch_list_newest_first_with_a_cursor(store: Store) -> None:
    user = f"u{uuid.uuid4().hex[:6]}"
    docs = []
    for i in range(3):
        doc = {**batch_doc(user, new_file_id()), "id": new_batch_id(T0 + i)}
        await store.batches.insert(doc)
        docs.append(doc)
    assert [d["id"] for d in await store.batches.list(user, 10, None)] == [
        d["id"] for d in docs[::-1]
    ]
    page = await store.batches.list(user, 2, None)
    assert [d["id"] for d in await store.batches.list(user, 2, page[-1]["id"])] == [docs[0]["id"]]


def line_request(batch_id: str, line: int, user: str = "alice") -> InferenceRequest:
    return InferenceRequest(
        request_id=batch_line_id(batch_id, line),
        user_id=user,
        task="embed",
        model="all-MiniLM-L6-v2",
        input=[f"text {line}"],
        estimated_tokens=2,
        created_at=T0,
        quota_day="2027-01-15",
        batch_id=batch_id,
        batch_line=line,
    )


async def test_the_sink_records_batch_lines_and_the_batch_reads_them(store: Store) -> None:
    batch_id = new_batch_id()
    reqs = [line_request(batch_id, i) for i in range(3)]
    await store.requests.upsert_events(reqs)
    assert await store.batches.terminal_rows(batch_id) == 0
    done = [
        ResultEvent.for_request(reqs[0], "completed", T0 + 1, result={"embeddings": [[0.5]]}),
        ResultEvent.for_request(
            reqs[2], "failed", T0 + 1, error={"type": "model_error", "message": "x"}
        ),
    ]
    await store.requests.upsert_events(done)
    assert await store.batches.terminal_rows(batch_id) == 2
    rows = await store.batches.line_rows(batch_id)
    assert [(r["batch_line"], r["status"]) for r in rows] == [
        (0, "completed"),
        (1, "queued"),
        (2, "failed"),
    ]
    assert (
        rows[0]["result"] == {"embeddings": [[0.5]]} and rows[0]["request_id"] == reqs[0].request_id
    )
    assert set(rows[0]) == {
        "request_id", "batch_line", "status", "result", "error", "usage", "model", "task",
        "created_at", "completed_at",
    }  # fmt: skip
    assert [r["batch_line"] for r in await store.batches.line_rows(batch_id, start=1, limit=1)] == [
        1
    ]


async def test_a_result_before_its_request_still_gets_the_batch_line(store: Store) -> None:
    batch_id = new_batch_id()
    req = line_request(batch_id, 0)
    await store.requests.upsert_events(
        [ResultEvent.for_request(req, "completed", T0 + 1, result={"x": 1})]
    )
    row = await store.pool.read_one(
        "SELECT batch_id, batch_line FROM requests WHERE request_id = $1", req.request_id
    )
    assert row == {"batch_id": batch_id, "batch_line": None}
    await store.requests.upsert_events([req])  # the request arrives late: its line is filled in
    row = await store.pool.read_one(
        "SELECT batch_id, batch_line, status FROM requests WHERE request_id = $1", req.request_id
    )
    assert row == {"batch_id": batch_id, "batch_line": 0, "status": "completed"}


async def test_one_statement_collapses_a_lines_request_and_result(store: Store) -> None:
    batch_id = new_batch_id()
    req = line_request(batch_id, 0)
    done = ResultEvent.for_request(req, "completed", T0 + 1, result={"x": 1})
    returned = await store.requests.upsert_events([req, done])
    assert [r["status"] for r in returned] == ["completed"]
    row = await store.pool.read_one(
        "SELECT batch_id, batch_line FROM requests WHERE request_id = $1", req.request_id
    )
    assert row == {"batch_id": batch_id, "batch_line": 0}
    assert (
        json.loads(json.dumps(await store.batches.line_rows(batch_id), default=str))[0]["status"]
        == "completed"
    )
