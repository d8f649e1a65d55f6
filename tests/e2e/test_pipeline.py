"""The whole path on real services: HTTP -> log -> RabbitMQ -> model -> RabbitMQ -> log -> PostgreSQL/Redis -> HTTP/SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.sse import read_sse

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", max_body_bytes="4096") as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture
async def api(http: aiohttp.ClientSession, pipeline: Pipeline, worker: WorkerProcess) -> Api:
    return await Api(http, worker.url, await pipeline.create_key("alice")).wait_key_active()


@pytest.mark.parametrize(
    ("body", "check"),
    [
        (
            {"task": "generate", "input": "Tell me about streams", "params": {"max_tokens": 12}},
            lambda r: isinstance(r["text"], str) and r["text"],
        ),
        (
            {"task": "embed", "input": ["a cat sat on the mat", "streams of events"]},
            lambda r: len(r["embeddings"]) == 2 and all(len(v) == 384 for v in r["embeddings"]),
        ),
    ],
    ids=["generate", "embed"],
)
async def test_request_completes_through_api_postgres_and_sse(
    api: Api,
    pipeline: Pipeline,
    worker: WorkerProcess,
    http: aiohttp.ClientSession,
    body: dict,
    check: Any,
) -> None:
    status, accepted, headers = await api.submit(body)
    assert status == 202, accepted
    rid = accepted["request_id"]
    assert accepted["status"] == "queued"
    assert accepted["links"] == {
        "self": f"/v1/requests/{rid}",
        "events": f"/v1/requests/{rid}/events",
    }
    assert headers["Location"] == f"/v1/requests/{rid}"
    for h in ("Limit-Requests", "Remaining-Requests", "Limit-Tokens", "Remaining-Tokens", "Reset"):
        assert int(headers[f"X-RateLimit-{h}"]) >= 0

    sse = await read_sse(http, f"{worker.url}/v1/requests/{rid}/events", api.key or "")
    assert sse.status == 200
    events = sse.events
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids)), events
    assert events[-1]["event"] == "completed"
    assert [e["event"] for e in events] == [
        s
        for s in ("queued", "dispatched", "running", "completed")
        if s in {e["event"] for e in events}
    ]
    final_event = events[-1]["data"]

    doc = await api.wait_status(rid, {"completed"})
    assert doc == final_event
    assert check(doc["result"])
    assert (
        doc["usage"]["total_tokens"]
        == doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"]
    )
    assert doc["attempts"] >= 1
    assert doc["estimated_tokens"] == accepted["estimated_tokens"]

    pool = await pipeline.store.connect()
    row = await pool.fetchrow(
        "SELECT status, usage, result, user_id FROM requests WHERE request_id = $1", rid
    )
    assert row is not None and row["status"] == "completed" and row["user_id"] == "alice"
    assert row["usage"]["total_tokens"] == doc["usage"]["total_tokens"]


async def test_list_and_quota_reflect_the_work(api: Api) -> None:
    status, accepted, _ = await api.submit({"task": "embed", "input": "one more"})
    assert status == 202
    await api.wait_status(accepted["request_id"], {"completed"})
    status, page, _ = await api.call("GET", "/v1/requests?limit=2")
    assert status == 200 and len(page["data"]) == 2 and page["has_more"]
    assert page["data"][0]["request_id"] == accepted["request_id"]
    status, quota, _ = await api.call("GET", "/v1/quota")
    assert status == 200
    assert quota["user_id"] == "alice" and quota["plan"] == "default"
    assert quota["requests"]["used"] >= 1 and quota["requests"]["limit"] == 100


async def test_errors_are_json(
    api: Api, worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    anonymous = Api(http, worker.url, None)
    cases = [
        (await anonymous.submit({"task": "embed", "input": "x"}), 401, "unauthorized"),
        (
            await Api(http, worker.url, "isk_wrong").submit({"task": "embed", "input": "x"}),
            401,
            "unauthorized",
        ),
        (await api.call("POST", "/v1/requests", data=b"{not json"), 400, "invalid_request"),
        (await api.submit({"task": "dance", "input": "x"}), 400, "invalid_request"),
        (await api.submit({"task": "embed", "input": []}), 400, "invalid_request"),
        (
            await api.submit({"task": "embed", "input": "x", "model": "nope"}),
            400,
            "invalid_request",
        ),
        (await api.submit({"task": "embed", "input": "x" * 5000}), 413, "payload_too_large"),
        (await api.get("req_0000000000000000000000ff"), 404, "not_found"),
        (await api.get("nonsense"), 404, "not_found"),
        (await api.call("GET", "/v1/requests?limit=0"), 400, "invalid_request"),
    ]
    for (status, body, _), want_status, want_type in cases:
        assert status == want_status, body
        assert body["error"]["type"] == want_type and body["error"]["message"], body
    # Each invalid field is named, as the spec's schema says it would be refused.
    named = [
        (await api.submit({"task": "embed", "input": "x", "model": ""}), "model"),
        (await api.submit({"task": "embed", "input": ["x"], "deadline_s": 0}), "deadline_s"),
        (await api.submit({"task": "generate", "input": "x", "params": {"max_tokens": 0}}), "params.max_tokens"),
        (await api.call("GET", "/v1/requests?after=page2"), "after"),
        (await api.call("GET", "/v1/requests?status=done"), "status"),
        # PostgreSQL cannot store U+0000: accepted, it used to wedge the sink's partition for ever.
        (await api.submit({"task": "embed", "input": ["ok", "a\u0000b"]}), "input[1]"),
        (await api.submit({"task": "embed", "input": "x", "metadata": {"k": "\u0000"}}), "metadata.k"),
    ]
    for (status, body, _), field in named:
        assert status == 400 and body["error"]["type"] == "invalid_request", body
        assert body["error"]["field"] == field, body


async def test_another_users_request_is_404(
    api: Api, pipeline: Pipeline, http: aiohttp.ClientSession, worker: WorkerProcess
) -> None:
    status, accepted, _ = await api.submit({"task": "embed", "input": "mine"})
    assert status == 202
    rid = accepted["request_id"]
    await api.wait_status(rid, {"completed"})
    bob = await Api(http, worker.url, await pipeline.create_key("bob")).wait_key_active()
    assert (await bob.get(rid))[0] == 404
    assert (await bob.call("GET", f"/v1/requests/{rid}/events"))[0] == 404
    assert (await bob.call("DELETE", f"/v1/requests/{rid}"))[0] == 404
    # A finished request cannot be cancelled.
    status, body, _ = await api.call("DELETE", f"/v1/requests/{rid}")
    assert status == 409 and body["error"]["type"] == "conflict"


async def test_ops_routes(worker: WorkerProcess, http: aiohttp.ClientSession) -> None:
    async with http.get(worker.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(worker.url + "/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["checks"]["tables_recovered"] is True
    async with http.get(worker.url + "/metrics") as r:
        assert "inferstream_admissions_total" in await r.text()
    async with http.get(worker.url + "/openapi.json") as r:
        assert "/v1/requests" in (await r.json())["paths"]
    async with http.get(worker.url + "/table/quota") as r:
        assert r.status == 404  # raw table pages are disabled
