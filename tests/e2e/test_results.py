"""Results on two real workers: idempotent rows, resumable SSE across workers, webhooks, the caller's list."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer

from bridges.clients.webhooks import SIGNATURE_HEADER, verify_signature
from inferstream.ids import new_request_id
from schemas.records import ResultEvent
from tests.support.listener import loopback_listener
from tests.support.modelserver import model_faults
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.sse import read_sse
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        yield p


@pytest.fixture(scope="module")
async def workers(pipeline: Pipeline) -> tuple[WorkerProcess, WorkerProcess]:
    a = await pipeline.start_worker()
    b = await pipeline.start_worker()
    # B's join rebalanced A: both must be ready again before the tests start.
    await a.wait_ready()
    return a, b


@pytest.fixture
async def alice(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess]
) -> Api:
    return await Api(http, workers[0].url, await pipeline.create_key("alice")).wait_key_active()


async def row_of(pipeline: Pipeline, request_id: str) -> dict[str, Any] | None:
    pool = await pipeline.store.connect()
    found = await pool.fetchrow("SELECT * FROM requests WHERE request_id = $1", request_id)
    return dict(found) if found is not None else None


async def produce_results(
    pipeline: Pipeline, events: list[ResultEvent], *, together: bool = False
) -> None:
    """Produce ``events`` in order; ``together`` sends them as one record batch (one sink batch)."""
    producer = AIOKafkaProducer(bootstrap_servers=pipeline.settings.bootstrap_servers)
    await producer.start()
    try:
        sent = []
        for event in events:
            key, value = orjson.dumps(event.user_id), event.to_bytes()
            if together:  # queued in the producer's buffer, not awaited one by one
                sent.append(
                    await producer.send(pipeline.settings.results_topic, key=key, value=value)
                )
            else:
                await producer.send_and_wait(pipeline.settings.results_topic, key=key, value=value)
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_duplicate_and_out_of_order_results_make_one_correct_row(
    alice: Api, pipeline: Pipeline
) -> None:
    status, accepted, _ = await alice.submit({"task": "embed", "input": "twice"})
    assert status == 202
    rid = accepted["request_id"]
    done = await alice.wait_status(rid, {"completed"})
    await wait_for(
        lambda: _status_is(pipeline, rid, "completed"), timeout=30, what="the completed row"
    )
    before = await row_of(pipeline, rid)
    assert before is not None

    # Redelivered copies of the real events, plus stale ones stamped later than the completion.
    base = dict(request_id=rid, user_id="alice", task="embed", model=before["model"])
    late = time.time() + 5
    replayed = ResultEvent(**base, status="completed", at=before["completed_at"].timestamp(),
                           result=before["result"], usage=before["usage"], attempts=before["attempts"])  # fmt: skip
    # A synthetic request: its events arrive twice each, terminal first.
    other = new_request_id()
    t0 = time.time()
    o = dict(request_id=other, user_id="alice", task="embed", model=before["model"], created_at=t0)
    synthetic = [
        ResultEvent(**o, status="completed", at=t0 + 3, result={"embeddings": [[0.5]]}, attempts=1),
        ResultEvent(**o, status="running", at=t0 + 2),
        ResultEvent(**o, status="completed", at=t0 + 3, result={"embeddings": [[0.5]]}, attempts=1),
        ResultEvent(**o, status="dispatched", at=t0 + 1),
        ResultEvent(**o, status="running", at=t0 + 2),
    ]
    stale = [
        replayed,
        ResultEvent(**base, status="running", at=late),
        ResultEvent(**base, status="failed", at=late, error={"type": "late", "message": "stale"}),
        replayed,
    ]
    marker = ResultEvent(**{**o, "request_id": new_request_id()}, status="completed", at=t0)
    # One key, one partition: once the marker's row exists, everything before it was applied.
    await produce_results(pipeline, [*stale, *synthetic, marker])
    await wait_for(lambda: row_of(pipeline, marker.request_id), timeout=30, what="the marker row")

    assert await row_of(pipeline, rid) == before  # nothing changed, not even updated_at or history
    status, doc, _ = await alice.get(rid)
    assert status == 200 and doc == done

    row = await row_of(pipeline, other)
    assert (
        row is not None
        and row["status"] == "completed"
        and row["result"] == {"embeddings": [[0.5]]}
    )
    assert [h["status"] for h in row["history"]] == ["dispatched", "running", "completed"]
    assert row["completed_at"].timestamp() == pytest.approx(t0 + 3, abs=1e-3)
    assert row["updated_at"].timestamp() == pytest.approx(t0 + 3, abs=1e-3)
    assert row["started_at"].timestamp() == pytest.approx(t0 + 2, abs=1e-3)
    pool = await pipeline.store.connect()
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE request_id = $1", other) == 1


async def _status_is(pipeline: Pipeline, rid: str, status: str) -> bool:
    row = await row_of(pipeline, rid)
    return row is not None and row["status"] == status


async def test_sse_across_workers_resume_and_ownership(
    http: aiohttp.ClientSession,
    pipeline: Pipeline,
    workers: tuple[WorkerProcess, WorkerProcess],
    model_base_url: str,
) -> None:
    a, b = workers
    users = [f"sse{i}" for i in range(4)]
    keys = {u: await pipeline.create_key(u) for u in users}
    apis = {u: await Api(http, a.url, keys[u]).wait_key_active() for u in users}
    await Api(http, b.url, keys[users[-1]]).wait_key_active()
    for w in (a, b):  # events must travel by pub/sub here, not by the polling fallback
        async with http.get(w.url + "/readyz") as r:
            assert (await r.json())["checks"]["redis_pubsub"] is True
    async with model_faults(http, model_base_url, latency_ms=3000):
        accepted = {}
        for u in users:
            status, body, _ = await apis[u].submit(
                {"task": "generate", "input": f"hi {u}", "params": {"max_tokens": 4}}
            )
            assert status == 202, body
            accepted[u] = body["request_id"]
        # Each request is watched on both workers: the sink that writes its rows runs on exactly
        # one of them (the owner of the user's partition), so one stream hears it from the other.
        streams = {
            (u, w.url): asyncio.ensure_future(
                read_sse(http, f"{w.url}/v1/requests/{accepted[u]}/events", keys[u])
            )
            for u in users
            for w in (a, b)
        }
        # A client that drops after its first event and resumes from its id.
        first = await read_sse(
            http, f"{b.url}/v1/requests/{accepted[users[0]]}/events", keys[users[0]], stop_after=1
        )
        results = dict(zip(streams, await asyncio.gather(*streams.values()), strict=True))
        resumed = await read_sse(
            http, f"{a.url}/v1/requests/{accepted[users[0]]}/events", keys[users[0]],
            last_event_id=str(first.events[0]["id"]),
        )  # fmt: skip
    for (u, url), got in results.items():
        assert got.status == 200
        ids = [e["id"] for e in got.events]
        assert ids == sorted(set(ids)) and len(ids) >= 2, (
            u,
            url,
            got.events,
        )  # heard live, not just loaded
        assert got.events[-1]["event"] == "completed" and got.events[-1]["data"]["result"]["text"]
    assert first.events and first.events[0]["id"] < 4
    assert resumed.events and all(e["id"] > first.events[0]["id"] for e in resumed.events)
    assert resumed.events[-1]["event"] == "completed"

    # After the end: Last-Event-ID 3 gets only the terminal event, 4 gets nothing and the stream ends.
    rid = accepted[users[1]]
    url = f"{b.url}/v1/requests/{rid}/events"
    tail = await read_sse(http, url, keys[users[1]], last_event_id="3")
    assert [(e["id"], e["event"]) for e in tail.events] == [(4, "completed")]
    assert (await read_sse(http, url, keys[users[1]], last_event_id="4")).events == []
    # Someone else's request does not exist for them, on either worker.
    for w in (a, b):
        assert (
            await read_sse(http, f"{w.url}/v1/requests/{rid}/events", keys[users[2]])
        ).status == 404
        assert (await Api(http, w.url, keys[users[2]]).get(rid))[0] == 404


async def _sse_user(
    http: aiohttp.ClientSession, pipeline: Pipeline, w: WorkerProcess, user: str
) -> tuple[Api, str]:
    key = await pipeline.create_key(user)
    return await Api(http, w.url, key).wait_key_active(), key


async def test_sse_open_while_queued_hears_each_status_once_even_when_one_batch_holds_them(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess]
) -> None:
    """dispatched, running and completed land in one sink batch; every open stream still hears all three."""
    a, b = workers
    api, key = await _sse_user(http, pipeline, a, "batched")
    await Api(http, b.url, key).wait_key_active()
    rid, t0 = new_request_id(), time.time()
    o = dict(
        request_id=rid,
        user_id="batched",
        task="generate",
        model="sim-gpt",
        created_at=t0,
        estimated_tokens=9,
    )
    await produce_results(pipeline, [ResultEvent(**o, status="queued", at=t0)])
    await api.wait_status(rid, {"queued"})
    opened = [asyncio.Event() for _ in range(4)]
    streams = [
        asyncio.ensure_future(read_sse(http, f"{w.url}/v1/requests/{rid}/events", key, opened=ev))
        for w, ev in zip((a, b, a, b), opened, strict=True)
    ]
    async with asyncio.timeout(30):
        for ev in opened:
            await ev.wait()
    rest = [
        ResultEvent(**o, status="dispatched", at=t0 + 0.001),
        ResultEvent(**o, status="running", at=t0 + 0.002),
        ResultEvent(**o, status="completed", at=t0 + 0.003, result={"text": "x"}, attempts=1),
    ]
    await produce_results(pipeline, rest, together=True)
    for got in await asyncio.gather(*streams):
        assert [(e["id"], e["event"]) for e in got.events] == [
            (1, "queued"),
            (2, "dispatched"),
            (3, "running"),
            (4, "completed"),
        ], got.events
        assert [e["data"]["status"] for e in got.events] == [e["event"] for e in got.events]
        assert got.events[-1]["data"]["result"] == {"text": "x"}
        assert "result" not in got.events[2]["data"] and "replayed" not in got.events[2]["data"]


async def test_sse_resume_replays_missed_events_then_live_and_snapshots_what_it_cannot_serve(
    http: aiohttp.ClientSession,
    pipeline: Pipeline,
    workers: tuple[WorkerProcess, WorkerProcess],
    model_base_url: str,
) -> None:
    a, b = workers
    api, key = await _sse_user(http, pipeline, a, "resumer")
    await Api(http, b.url, key).wait_key_active()
    async with model_faults(http, model_base_url, latency_ms=2500):
        status, body, _ = await api.submit(
            {"task": "generate", "input": "resume me", "params": {"max_tokens": 4}}
        )
        assert status == 202, body
        rid = body["request_id"]
        url_a, url_b = (f"{w.url}/v1/requests/{rid}/events" for w in (a, b))
        live = asyncio.ensure_future(read_sse(http, url_b, key))
        first = await read_sse(http, url_a, key, stop_after=1)
        first_id = first.events[0]["id"]
        assert first_id in (1, 2), first.events
        await api.wait_status(rid, {"running"})
        # Resumed during `running`: the missed events are replayed, then `completed` arrives live.
        during = await read_sse(http, url_a, key, last_event_id=str(first_id))
        full = await live
    after = await read_sse(http, url_b, key, last_event_id=str(first_id))
    expected = list(range(first_id + 1, 5))
    for got in (during, after):
        assert [e["id"] for e in got.events] == expected, got.events
        assert [e["event"] for e in got.events][-2:] == ["running", "completed"]
    heard = {e["id"]: e["data"] for e in full.events}
    assert [e["id"] for e in full.events] == list(range(full.events[0]["id"], 5))
    for e in during.events + after.events:
        assert "replayed" not in e["data"]
        if e["id"] in heard:  # a replayed event is the very document the live stream heard
            assert e["data"] == heard[e["id"]]

    # Ids the history cannot serve get one event with the current state, marked as a snapshot.
    _, current, _ = await api.get(rid)
    for bad in ("99", "-1", "not-a-number"):
        got = await read_sse(http, url_a, key, last_event_id=bad)
        assert [(e["id"], e["event"]) for e in got.events] == [(4, "completed")], (bad, got.events)
        assert got.events[0]["data"] == {**current, "replayed": "snapshot"}
    # The history is gone with the cache (TTL, eviction, a Redis restart): PostgreSQL serves the state.
    raw = aioredis.Redis.from_url(pipeline.settings.redis_url)
    try:
        assert await raw.delete(f"{pipeline.namespace}:req:{rid}") == 1
    finally:
        await raw.aclose()
    got = await read_sse(http, url_b, key, last_event_id=str(first_id))
    assert [(e["id"], e["event"]) for e in got.events] == [(4, "completed")]
    assert got.events[0]["data"] == {**current, "replayed": "snapshot"}
    assert (await read_sse(http, url_b, key, last_event_id="4")).events == []


@pytest.mark.parametrize("latency_ms", [0, 300])
async def test_sse_under_load_every_stream_hears_each_status_and_every_resume_replays(
    http: aiohttp.ClientSession,
    pipeline: Pipeline,
    workers: tuple[WorkerProcess, WorkerProcess],
    model_base_url: str,
    latency_ms: int,
) -> None:
    """40 requests at once; each watched live on one worker and dropped after one event on the other.

    At 0 ms a request's events crowd into the same sink batches; at 300 ms `running` is reported.
    """
    a, b = workers
    n = 40
    api, key = await _sse_user(http, pipeline, a, f"ssecrowd{latency_ms}")
    await Api(http, b.url, key).wait_key_active()
    url = "{}/v1/requests/{}/events"
    async with model_faults(http, model_base_url, latency_ms=latency_ms):

        async def one(i: int) -> tuple[str, Any, Any]:
            status, body, _ = await api.submit(
                {"task": "generate", "input": f"crowd {i}", "params": {"max_tokens": 4}}
            )
            assert status == 202, body
            rid = body["request_id"]
            live = asyncio.ensure_future(read_sse(http, url.format(b.url, rid), key, timeout=90))
            first = await read_sse(http, url.format(a.url, rid), key, stop_after=1, timeout=90)
            return rid, await live, first

        runs = await asyncio.gather(*(one(i) for i in range(n)))
    began = time.perf_counter()
    resumed = await asyncio.gather(
        *(
            read_sse(http, url.format(b.url, rid), key, last_event_id=str(first.events[0]["id"]))
            for rid, _, first in runs
        )
    )
    resume_s = time.perf_counter() - began
    gaps = dupes = short_resumes = changed = 0
    bad: list[Any] = []
    for (_, live, first), again in zip(runs, resumed, strict=True):
        ids = [e["id"] for e in live.events]
        dupes += len(ids) - len(set(ids)) + len(again.events) - len({e["id"] for e in again.events})
        optional = {3} if latency_ms < 50 and 3 not in ids else set()  # fast work: no `running`
        gaps += ids != sorted(set(range(ids[0], 5)) - optional)
        start = first.events[0]["id"]
        got = [e["id"] for e in again.events]
        if got != sorted(set(range(start + 1, 5)) - optional):
            short_resumes += 1
            bad.append((start, ids, [(e["id"], e["data"].get("replayed")) for e in again.events]))
        heard = {e["id"]: e["data"] for e in live.events}
        changed += any(e["data"] != heard.get(e["id"], e["data"]) for e in again.events)
    opened_queued = sum(live.events[0]["id"] == 1 for _, live, _ in runs)
    print(
        f"\nSSE under load, model {latency_ms} ms: {n} requests, {n} live streams ({opened_queued} opened while queued): "
        f"{gaps} with a gap, {dupes} duplicate ids; {n} resumes from the first event id in "
        f"{resume_s:.2f}s: {short_resumes} missed events, {changed} replayed a different document"
    )
    assert (gaps, dupes, short_resumes, changed) == (0, 0, 0, 0), bad


async def test_webhook_is_signed_retried_and_recorded(alice: Api, pipeline: Pipeline) -> None:
    calls: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append((await request.read(), dict(request.headers)))
        return web.Response(status=503 if len(calls) <= 2 else 200)

    async with loopback_listener(hook) as url:
        status, accepted, _ = await alice.submit({"task": "embed", "input": "call me back", "callback_url": url})
        assert status == 202, accepted
        rid = accepted["request_id"]

        async def delivered() -> dict[str, Any] | None:
            row = await row_of(pipeline, rid)
            return row if row and row["webhook_state"] == "delivered" else None

        row = await wait_for(delivered, timeout=45, what="the webhook delivered")
    assert row["webhook_attempts"] == 3 and row["webhook_delivered_at"] is not None
    assert row["webhook_last_error"] is None
    assert len(calls) == 3
    secret = pipeline.settings.webhook_secret
    for body, headers in calls:
        assert verify_signature(secret, body, headers[SIGNATURE_HEADER])
        assert not verify_signature("another secret", body, headers[SIGNATURE_HEADER])
    doc = orjson.loads(calls[-1][0])
    assert doc["request_id"] == rid and doc["status"] == "completed" and doc["result"]["embeddings"]
    assert calls[0][0] == calls[-1][0]  # the same signed document every attempt


INTERNAL_CALLBACKS = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0177.0.0.1:{port}/hook",
    "http://0x7f.1:{port}/hook",
    "http://169.254.169.254/latest/meta-data/",  # refused before any connection is tried
]


async def test_internal_callback_urls_are_refused_at_submit(
    broker_url: str, model_base_url: str, http: aiohttp.ClientSession
) -> None:
    """SSRF: without an allow-list entry, every spelling of loopback is a 400 and costs nothing."""
    calls: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.read())
        return web.Response(status=200)

    async with loopback_listener(hook) as hook_url, Pipeline.session(
        broker_url, model_base_url + "/v1", webhook_allow=""
    ) as strict:
        port = int(hook_url.split(":")[2].split("/")[0])
        worker = await strict.start_worker()
        api = await Api(http, worker.url, await strict.create_key("mallory")).wait_key_active()
        for spelling in INTERNAL_CALLBACKS:
            url = spelling.format(port=port)
            status, body, _ = await api.submit(
                {"task": "embed", "input": "x", "callback_url": url}
            )
            assert status == 400, (url, body)
            assert body["error"]["type"] == "invalid_request", body
            assert body["error"]["field"] == "callback_url", body
        # The same worker accepts the same request without the callback.
        status, accepted, _ = await api.submit({"task": "embed", "input": "x"})
        assert status == 202, accepted
        await api.wait_status(accepted["request_id"], {"completed"}, timeout=60)
        _, quota, _ = await api.call("GET", "/v1/quota")
        assert quota["requests"]["used"] == 1  # the refused ones were never admitted
    assert calls == []


async def test_list_filters_by_status_and_pages_own_requests_only(
    http: aiohttp.ClientSession, pipeline: Pipeline, workers: tuple[WorkerProcess, WorkerProcess]
) -> None:
    a, b = workers
    dave = await Api(http, b.url, await pipeline.create_key("dave")).wait_key_active()
    erin = await Api(http, a.url, await pipeline.create_key("erin")).wait_key_active()
    mine = []
    for i in range(5):
        status, body, _ = await dave.submit({"task": "embed", "input": f"list {i}"})
        assert status == 202
        mine.append(body["request_id"])
    status, body, _ = await erin.submit({"task": "embed", "input": "not dave's"})
    assert status == 202
    theirs = body["request_id"]
    for rid in mine:
        await dave.wait_status(rid, {"completed"})
    # The list reads PostgreSQL: wait until every row is there and final.
    await wait_for(lambda: _listed(dave, "completed", 5), timeout=30, what="dave's rows completed")

    seen: list[str] = []
    after = None
    while True:
        path = "/v1/requests?status=completed&limit=2" + (f"&after={after}" if after else "")
        status, page, _ = await dave.call("GET", path)
        assert status == 200 and len(page["data"]) <= 2
        seen += [d["request_id"] for d in page["data"]]
        assert all(d["status"] == "completed" for d in page["data"])
        if not page["has_more"]:
            assert page["next_after"] is None
            break
        after = page["next_after"]
    assert seen == sorted(mine, reverse=True)  # newest first, each once, only dave's
    assert theirs not in seen
    status, page, _ = await dave.call("GET", "/v1/requests?status=failed")
    assert status == 200 and page["data"] == [] and page["has_more"] is False
    status, page, _ = await erin.call("GET", "/v1/requests")
    assert [d["request_id"] for d in page["data"]] == [theirs]


async def _listed(api: Api, status: str, n: int) -> bool:
    code, page, _ = await api.call("GET", f"/v1/requests?status={status}&limit=100")
    return code == 200 and len(page["data"]) >= n
