"""Files and batches in a real PostgreSQL (the aggregates), and the ``/v1/files`` views over a real aiohttp server."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import patch

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridges.clients.store import Store
from inferstream.errors import Unauthorized
from inferstream.ids import batch_line_id, new_batch_id, new_file_id
from inferstream.settings import Settings
from schemas.plans import DEFAULT_PLAN
from schemas.records import InferenceRequest, ResultEvent
from streams.gateway.files import FileViews
from streams.gateway.http import guarded
from tables.keys import Principal
from tests.support.postgres import fresh_store

pytestmark = pytest.mark.integration
T0 = 1_800_000_000.0


@pytest.fixture(scope="module")
async def store() -> AsyncIterator[Store]:
    async with fresh_store() as s:
        yield s


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


# ---- the /v1/files views over a real aiohttp server -----------------------------------------

KEYS = {"key-alice": "alice-v", "key-bob": "bob-v"}
MAX_BYTES = 64 * 1024
MAX_LINES = 50


async def authenticate(key: str | None) -> Principal:
    """The views' authentication seam (KeyCache.authenticate in the pipeline; tested with it there)."""
    if not key:
        raise Unauthorized("missing API key")
    if key not in KEYS:
        raise Unauthorized("invalid or revoked API key")
    return Principal(user_id=KEYS[key], plan=DEFAULT_PLAN)


def jsonl(n: int, start: int = 0, url: str = "/v1/embeddings") -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"line-{i}", "method": "POST", "url": url, "body": {"input": f"text {i}"}}
        ).encode()
        + b"\n"
        for i in range(start, start + n)
    )


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, views: FileViews) -> None:
        self.session, self.base, self.views = session, base, views

    async def upload(
        self,
        content: bytes,
        *,
        key: str | None = "key-alice",
        purpose: str | None = "batch",
        filename: str = "in.jsonl",
        purpose_last: bool = False,
    ) -> tuple[int, Any]:
        form = aiohttp.FormData()
        if purpose is not None and not purpose_last:
            form.add_field("purpose", purpose)
        form.add_field("file", content, filename=filename, content_type="application/jsonl")
        if purpose is not None and purpose_last:
            form.add_field("purpose", purpose)
        async with self.session.post(
            f"{self.base}/v1/files", data=form, headers=self.auth(key)
        ) as r:
            body = await r.json()
        await self.views.settle()
        return r.status, body

    async def call(self, method: str, path: str, key: str | None = "key-alice") -> tuple[int, Any]:
        async with self.session.request(method, f"{self.base}{path}", headers=self.auth(key)) as r:
            return r.status, await r.json()

    async def content(self, file_id: str, key: str = "key-alice") -> tuple[int, bytes, str]:
        async with self.session.get(
            f"{self.base}/v1/files/{file_id}/content", headers=self.auth(key)
        ) as r:
            return r.status, await r.read(), r.content_type

    @staticmethod
    def auth(key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}


async def serve(store: Store, max_bytes: int, max_lines: int) -> AsyncIterator[Api]:
    views = FileViews(store.files, authenticate, max_bytes=max_bytes, max_lines=max_lines)
    web_app = web.Application()  # aiohttp's default client_max_size (1 MiB), as Faust's web server
    views.add_routes(web_app, guarded)
    async with TestServer(web_app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        yield Api(session, str(server.make_url("")).rstrip("/"), views)


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    async for a in serve(store, MAX_BYTES, MAX_LINES):
        yield a


async def stored_files(store: Store) -> int:
    row = await store.pool.read_one("SELECT count(*) AS n FROM files")
    assert row is not None
    return int(row["n"])


async def test_upload_get_content_list_and_delete(api: Api, store: Store) -> None:
    content = jsonl(3)
    status, obj = await api.upload(content)
    assert status == 200, obj
    assert set(obj) == {
        "id",
        "object",
        "bytes",
        "created_at",
        "filename",
        "purpose",
        "status",
        "status_details",
    }
    assert (obj["object"], obj["bytes"], obj["filename"], obj["purpose"], obj["status"]) == (
        "file",
        len(content),
        "in.jsonl",
        "batch",
        "processed",
    )
    assert abs(obj["created_at"] - time.time()) < 60
    assert await api.call("GET", f"/v1/files/{obj['id']}") == (200, obj)
    assert await api.content(obj["id"]) == (200, content, "application/jsonl")
    status, listed = await api.call("GET", "/v1/files")
    assert status == 200 and listed["object"] == "list" and obj in listed["data"]
    assert await api.call("DELETE", f"/v1/files/{obj['id']}") == (
        200,
        {"id": obj["id"], "object": "file", "deleted": True},
    )
    assert (await api.call("GET", f"/v1/files/{obj['id']}"))[0] == 404
    assert (await api.call("DELETE", f"/v1/files/{obj['id']}"))[0] == 404


async def test_a_file_several_parts_long_round_trips_byte_identical(store: Store) -> None:
    content = jsonl(40_000)  # ~3.6 MB over reads of 256 KiB: lines span reads
    async for api in serve(store, 8 * 1024 * 1024, 50_000):
        with patch("streams.gateway.files.PART_BYTES", 1024 * 1024):
            status, obj = await api.upload(content, filename="big.jsonl")
        assert status == 200, obj
        parts = await store.pool.read(
            "SELECT count(*) AS n FROM file_parts WHERE file_id = $1", obj["id"]
        )
        assert parts[0]["n"] == -(-len(content) // (1024 * 1024))
        status, back, _ = await api.content(obj["id"])
        assert status == 200 and back == content


async def test_crlf_lines_and_no_final_newline_are_accepted(api: Api) -> None:
    content = jsonl(2).replace(b"\n", b"\r\n").rstrip(b"\r\n")
    status, obj = await api.upload(content, filename="data.txt")
    assert status == 200, obj
    assert await api.content(obj["id"]) == (200, content, "application/octet-stream")


async def test_owner_isolation(api: Api) -> None:
    _, obj = await api.upload(jsonl(1))
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        status, body = (
            await api.call(method, f"/v1/files/{obj['id']}{path}", key="key-bob")
            if path != "/content"
            else (await api.content(obj["id"], key="key-bob"))[:2]
        )
        assert status == 404, (method, path, body)
    status, listed = await api.call("GET", "/v1/files", key="key-bob")
    assert status == 200 and obj["id"] not in [f["id"] for f in listed["data"]]
    assert (await api.call("GET", f"/v1/files/{obj['id']}"))[0] == 200


async def test_list_pages_and_filters(store: Store) -> None:
    KEYS["key-carol"] = f"carol-{uuid.uuid4().hex[:6]}"
    async for api in serve(store, MAX_BYTES, MAX_LINES):
        ids = [(await api.upload(jsonl(1), key="key-carol"))[1]["id"] for _ in range(3)]
        status, page = await api.call("GET", "/v1/files?limit=2", key="key-carol")
        assert status == 200
        assert [f["id"] for f in page["data"]] == ids[:0:-1] and page["has_more"] is True
        assert (page["first_id"], page["last_id"]) == (ids[2], ids[1])
        _, rest = await api.call(
            "GET", f"/v1/files?limit=2&after={page['last_id']}", key="key-carol"
        )
        assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
        _, outputs = await api.call("GET", "/v1/files?purpose=batch_output", key="key-carol")
        assert outputs["data"] == []
        assert (await api.call("GET", "/v1/files?purpose=fine-tune", key="key-carol"))[0] == 400
        assert (await api.call("GET", "/v1/files?after=nope", key="key-carol"))[0] == 400


async def test_too_large_is_413_json_and_keeps_nothing(api: Api, store: Store) -> None:
    before = await stored_files(store)
    status, body = await api.upload(jsonl(1000))  # ~90 KB > 64 KiB
    assert status == 413 and body["error"]["type"] == "payload_too_large", body
    status, body = await api.upload(jsonl(3000))  # refused on its Content-Length alone
    assert status == 413 and body["error"]["limit"] == MAX_BYTES, body
    assert await stored_files(store) == before


async def test_too_large_while_streaming_without_a_content_length(api: Api, store: Store) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield jsonl(100, start=i * 100)

    before = await stored_files(store)
    with aiohttp.MultipartWriter("form-data") as writer:
        writer.append("batch").set_content_disposition("form-data", name="purpose")
        part = writer.append(chunks(), {"Content-Type": "application/jsonl"})
        part.set_content_disposition("form-data", name="file", filename="in.jsonl")
        async with api.session.post(
            f"{api.base}/v1/files", data=writer, headers=api.auth("key-alice")
        ) as r:
            assert r.status == 413 and (await r.json())["error"]["type"] == "payload_too_large"
    await api.views.settle()
    assert await stored_files(store) == before


async def test_bad_lines_are_400_with_their_numbers_and_nothing_is_kept(
    api: Api, store: Store
) -> None:
    lines = jsonl(4).splitlines()
    lines[1] = b"not json"
    lines[3] = json.dumps(
        {"custom_id": "line-0", "method": "POST", "url": "/v1/embeddings", "body": {}}
    ).encode()
    lines.append(
        json.dumps(
            {"custom_id": "x", "method": "GET", "url": "/v1/embeddings", "body": {}}
        ).encode()
    )
    before = await stored_files(store)
    status, body = await api.upload(b"\n".join(lines) + b"\n")
    assert status == 400 and body["error"]["type"] == "invalid_request"
    assert [e["line"] for e in body["error"]["errors"]] == [2, 4, 5]
    assert "3 invalid lines" in body["error"]["message"]
    assert "not unique" in body["error"]["errors"][1]["message"]
    assert await stored_files(store) == before


async def test_too_many_lines_is_400(api: Api, store: Store) -> None:
    before = await stored_files(store)
    status, body = await api.upload(jsonl(MAX_LINES + 1))
    assert status == 400 and str(MAX_LINES) in body["error"]["message"], body
    assert await stored_files(store) == before


@pytest.mark.parametrize(
    ("purpose", "last"),
    [("fine-tune", False), ("fine-tune", True), ("batch_output", False), (None, False)],
)
async def test_wrong_or_missing_purpose_is_400_and_keeps_nothing(
    api: Api, store: Store, purpose: str | None, last: bool
) -> None:
    before = await stored_files(store)
    status, body = await api.upload(jsonl(2), purpose=purpose, purpose_last=last)
    assert status == 400 and body["error"]["field"] == "purpose", body
    assert await stored_files(store) == before


async def test_purpose_after_the_file_is_accepted(api: Api) -> None:
    status, obj = await api.upload(jsonl(2), purpose_last=True)
    assert status == 200 and obj["purpose"] == "batch"


async def test_empty_file_missing_file_and_long_filename_are_400(api: Api) -> None:
    assert (await api.upload(b""))[0] == 400
    assert (await api.upload(jsonl(1), filename="x" * 256 + ".jsonl"))[0] == 400
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("purpose", "batch")
    form.add_field("other", "x")
    async with api.session.post(
        f"{api.base}/v1/files", data=form, headers=api.auth("key-alice")
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["field"] == "file"
    async with api.session.post(
        f"{api.base}/v1/files", json={"purpose": "batch"}, headers=api.auth("key-alice")
    ) as r:
        assert r.status == 400 and "multipart" in (await r.json())["error"]["message"]


async def test_a_malformed_part_header_is_400_json(api: Api, store: Store) -> None:
    """aiohttp's parser raises InvalidHeader (no ValueError) for it: found by the OpenAPI conformance run."""
    before = await stored_files(store)
    body = b'--b\r\nContent-Disposition form-data; name="file"\r\n\x00bad\r\n\r\n{}\r\n--b--\r\n'
    headers = {**api.auth("key-alice"), "Content-Type": "multipart/form-data; boundary=b"}
    async with api.session.post(f"{api.base}/v1/files", data=body, headers=headers) as r:
        answer = await r.json()
        assert r.status == 400 and "malformed multipart" in answer["error"]["message"], answer
    await api.views.settle()
    assert await stored_files(store) == before


async def test_fields_beside_the_file_are_bounded(api: Api, store: Store) -> None:
    before = await stored_files(store)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", jsonl(2), filename="in.jsonl")
    form.add_field("note", "x" * 20_000)
    async with api.session.post(
        f"{api.base}/v1/files", data=form, headers=api.auth("key-alice")
    ) as r:
        body = await r.json()
        assert r.status == 400 and body["error"]["field"] == "note", body
    await api.views.settle()
    assert await stored_files(store) == before


async def test_missing_or_bad_key_is_401(api: Api) -> None:
    assert (await api.upload(jsonl(1), key=None))[0] == 401
    assert (await api.call("GET", "/v1/files", key=None))[0] == 401
    assert (await api.call("GET", "/v1/files", key="key-mallory"))[0] == 401
    assert (await api.call("GET", f"/v1/files/{new_file_id()}", key=None))[0] == 401


async def test_an_unknown_or_malformed_id_is_404(api: Api) -> None:
    assert (await api.call("GET", f"/v1/files/{new_file_id()}"))[0] == 404
    assert (await api.call("GET", "/v1/files/not-an-id"))[0] == 404
    assert (await api.content(new_file_id()))[0] == 404


async def test_deleting_the_input_of_a_running_batch_hides_it_and_keeps_its_bytes(
    api: Api, store: Store
) -> None:
    _, obj = await api.upload(jsonl(2))
    await store.batches.insert(batch_doc("alice-v", obj["id"]))
    assert (await api.call("DELETE", f"/v1/files/{obj['id']}"))[0] == 200
    assert (await api.call("GET", f"/v1/files/{obj['id']}"))[0] == 404
    assert await store.files.read_all(obj["id"]) == jsonl(2)


async def test_the_default_limit_takes_100_mb_and_refuses_one_byte_more(store: Store) -> None:
    """Faust's web server is aiohttp with its default client_max_size (1 MiB): the streamed reader is not
    bound by it, so the 100 MB limit is ours, answered as JSON."""
    limit = Settings().file_max_bytes
    lines, width = 40_960, 2560  # 100 MiB exactly, within batch_max_lines

    def line(i: int) -> bytes:
        empty = json.dumps(
            {
                "custom_id": f"c-{i:05d}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"input": ""},
            }
        )
        return (
            json.dumps(
                {
                    "custom_id": f"c-{i:05d}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"input": "x" * (width - 1 - len(empty))},
                }
            ).encode()
            + b"\n"
        )

    body = b"".join(line(i) for i in range(lines))
    assert len(body) == limit
    async for api in serve(store, limit, Settings().batch_max_lines):
        status, obj = await api.upload(body)
        assert status == 200 and obj["bytes"] == limit, obj
        status, back, _ = await api.content(obj["id"])
        assert status == 200 and back == body
        status, err = await api.upload(body + b" ")
        assert status == 413 and err["error"]["type"] == "payload_too_large"


async def test_the_official_openai_client_uploads_lists_reads_and_deletes(api: Api) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(api_key="key-alice", base_url=f"{api.base}/v1", max_retries=0)
    content = jsonl(3)
    try:
        created = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert (created.object, created.bytes, created.filename, created.purpose) == (
            "file", len(content), "in.jsonl", "batch"
        )  # fmt: skip
        assert (await client.files.retrieve(created.id)).id == created.id
        assert created.id in [f.id async for f in client.files.list(purpose="batch")]
        assert (await client.files.content(created.id)).content == content
        with pytest.raises(openai.BadRequestError) as bad:
            await client.files.create(file=("in.jsonl", b"nope\n"), purpose="batch")
        assert bad.value.body["errors"] == [
            {"line": 1, "message": bad.value.body["errors"][0]["message"]}
        ]
        assert (await client.files.delete(created.id)).deleted is True
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(created.id)
    finally:
        await client.close()
