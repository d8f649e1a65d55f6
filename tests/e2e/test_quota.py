"""Exact quotas on real workers: concurrency, two workers, reservations, refunds, idempotency, keys, audit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from inferstream.tokens import estimate_tokens
from schemas.records import InferenceRequest, ResultEvent
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

BURST = 500
QUOTA_ERROR_KEYS = {"type", "message", "requests", "tokens"}
Reply = tuple[int, Any, dict[str, str]]


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def solo(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        yield p


@pytest.fixture(scope="module")
async def solo_worker(solo: Pipeline) -> WorkerProcess:
    return await solo.start_worker()


@pytest.fixture(scope="module")
async def pair(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    """Two pipeline-only workers sharing the partitions (no ML: nothing completes, nothing is refunded)."""
    async with Pipeline.session(broker_url, model_base_url + "/v1", roles="pipeline") as p:
        yield p


@pytest.fixture(scope="module")
async def pair_workers(pair: Pipeline) -> tuple[WorkerProcess, WorkerProcess, list[Reply]]:
    """Both workers, and what the first answered while the second joined (rebalance)."""
    first = await pair.start_worker()
    await pair.set_plan("watch", requests_per_day=1_000_000, tokens_per_day=10**9)
    async with aiohttp.ClientSession() as http:
        watcher = await Api(http, first.url, await pair.create_key("watcher", "watch")).wait_key_active()
        seen: list[Reply] = []
        second_task = asyncio.ensure_future(pair.start_worker())
        while not second_task.done():
            seen.append(await watcher.call("GET", "/v1/quota"))
            await asyncio.sleep(0.02)  # pacing the probe, not synchronisation
        second = second_task.result()
        await first.wait_ready()
        for w in (first, second):
            await Api(http, w.url, watcher.key).wait_key_active(timeout=30)
    return first, second, seen


@pytest.fixture
async def faults(model_base_url: str) -> AsyncIterator[Callable[..., Awaitable[None]]]:
    """Set the model server's injected faults; all reset afterwards."""
    async with aiohttp.ClientSession() as http:

        async def set_faults(**changes: Any) -> None:
            async with http.post(f"{model_base_url}/admin/faults", json=changes) as r:
                assert r.status == 200, await r.text()

        try:
            yield set_faults
        finally:
            await set_faults(
                latency_ms=0, error_rate=0, error_status=503, fail_next=0, apply_to_embeddings=False
            )


# ---- helpers ----------------------------------------------------------------------------


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def user_with_plan(
    pipeline: Pipeline, http: aiohttp.ClientSession, urls: list[str], **limits: Any
) -> tuple[str, list[Api]]:
    plan, user = fresh("plan"), fresh("user")
    await pipeline.set_plan(plan, **limits)
    key = await pipeline.create_key(user, plan)
    return user, [await Api(http, url, key).wait_key_active(timeout=20) for url in urls]


async def burst(apis: list[Api], n: int, body: dict[str, Any]) -> list[Reply]:
    """``n`` submissions at once, spread over ``apis``, each on its own connection."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [Api(session, a.base_url, a.key) for a in apis]
        return list(await asyncio.gather(*(clients[i % len(clients)].submit(body) for i in range(n))))


async def quota(api: Api) -> dict[str, Any]:
    status, body, _ = await api.call("GET", "/v1/quota")
    assert status == 200, body
    return dict(body)


async def settled_quota(api: Api, what: str, within_s: float = 30) -> dict[str, Any]:
    """The quota once no reservation is left (every result settled)."""

    async def check() -> dict[str, Any] | None:
        q = await quota(api)
        return q if q["tokens"]["reserved"] == 0 else None

    result: dict[str, Any] = await wait_for(check, timeout=within_s, interval=0.1, what=what)
    return result


def assert_exact(replies: list[Reply], admitted: int, error_type: str, limits: dict[str, int]) -> None:
    statuses = Counter(status for status, _, _ in replies)
    assert statuses == {202: admitted, 429: len(replies) - admitted}, statuses
    remaining = sorted(int(h["X-RateLimit-Remaining-Requests"]) for s, _, h in replies if s == 202)
    if error_type == "request_quota_exceeded":
        # Every admission saw a different count: they were decided one at a time.
        assert remaining == list(range(admitted)), remaining
    for status, body, headers in replies:
        if status != 429:
            continue
        error = body["error"]
        assert error["type"] == error_type, body
        assert QUOTA_ERROR_KEYS <= set(error), body
        assert set(error["requests"]) == {"used", "limit"}
        assert set(error["tokens"]) == {"used", "reserved", "limit", "estimated"}
        assert error["requests"]["limit"] == limits["requests"]
        assert error["tokens"]["limit"] == limits["tokens"]
        assert 1 <= int(headers["Retry-After"]) <= 86_400


def embed_estimate(text: str) -> int:
    return estimate_tokens("embed", [text], None, 256)


# ---- exact admission under concurrency ---------------------------------------------------


async def test_500_concurrent_against_100_remaining_admits_exactly_100(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(
        solo, http, [solo_worker.url], requests_per_day=110, tokens_per_day=10**7
    )
    for _ in range(10):  # 100 left of 110
        assert (await api.submit({"task": "embed", "input": "warm up"}))[0] == 202
    replies = await burst([api], BURST, {"task": "embed", "input": "the same short text"})
    assert_exact(replies, 100, "request_quota_exceeded", {"requests": 110, "tokens": 10**7})
    q = await quota(api)
    assert q["requests"] == {"used": 110, "limit": 110, "remaining": 0}


async def test_two_workers_admit_exactly_100_of_500(
    pair: Pipeline,
    pair_workers: tuple[WorkerProcess, WorkerProcess, list[Reply]],
    http: aiohttp.ClientSession,
) -> None:
    first, second, _ = pair_workers
    user, apis = await user_with_plan(
        pair, http, [first.url, second.url], requests_per_day=100, tokens_per_day=10**7
    )
    replies = await burst(apis, BURST, {"task": "embed", "input": "two workers"})
    assert_exact(replies, 100, "request_quota_exceeded", {"requests": 100, "tokens": 10**7})
    for api in apis:  # both workers answer from the owner's table
        assert (await quota(api))["requests"]["used"] == 100
    forwarded = [await metric(http, w.url, "inferstream_gateway_forwarded_total") for w in (first, second)]
    assert sum(forwarded) >= BURST // 2, forwarded  # half the burst reached the non-owner


async def test_two_workers_rebalance_answers_503_with_retry_after_or_decides(
    pair_workers: tuple[WorkerProcess, WorkerProcess, list[Reply]],
) -> None:
    _, _, seen = pair_workers
    assert seen, "no probe ran while the second worker joined"
    for status, body, headers in seen:
        assert status in (200, 503), (status, body)
        if status == 503:
            assert body["error"]["type"] == "unavailable" and int(headers["Retry-After"]) >= 1


@pytest.mark.parametrize("topology", ["one worker", "two workers"])
async def test_token_budget_admits_exactly_k(
    topology: str,
    solo: Pipeline,
    solo_worker: WorkerProcess,
    pair: Pipeline,
    pair_workers: tuple[WorkerProcess, WorkerProcess, list[Reply]],
    http: aiohttp.ClientSession,
) -> None:
    text, k = "count these tokens exactly please", 37
    estimate = embed_estimate(text)
    if topology == "one worker":
        pipeline, urls = solo, [solo_worker.url]
    else:
        pipeline, urls = pair, [pair_workers[0].url, pair_workers[1].url]
    # Embedding usage equals the estimate (same tokenizer, identical inputs share a batch's
    # usage evenly), so a result completing during the burst frees nothing: exactly k fit.
    user, apis = await user_with_plan(
        pipeline, http, urls, requests_per_day=100_000, tokens_per_day=k * estimate
    )
    replies = await burst(apis, BURST, {"task": "embed", "input": text})
    assert_exact(
        replies, k, "token_quota_exceeded", {"requests": 100_000, "tokens": k * estimate}
    )
    rejected = next(body["error"] for status, body, _ in replies if status == 429)
    assert rejected["tokens"]["estimated"] == estimate
    assert rejected["tokens"]["used"] + rejected["tokens"]["reserved"] == k * estimate
    q = await quota(apis[0])
    assert q["requests"]["used"] == k
    assert q["tokens"]["used"] + q["tokens"]["reserved"] == k * estimate


# ---- reservation, settlement, refunds ----------------------------------------------------


async def test_reservation_becomes_actual_usage(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    bodies: list[dict[str, Any]] = [
        {"task": "generate", "input": "Write about rivers", "params": {"max_tokens": 200}},
        {"task": "generate", "input": "Short", "params": {"max_tokens": 5}},
        {"task": "embed", "input": ["one text", "and another text"]},
    ]
    ids, estimated = [], 0
    for body in bodies:
        status, accepted, _ = await api.submit(body)
        assert status == 202, accepted
        ids.append(accepted["request_id"])
        estimated += accepted["estimated_tokens"]
    docs = [await api.wait_status(rid, {"completed"}) for rid in ids]
    q = await settled_quota(api, "all three results settled")
    assert q["tokens"]["used"] == sum(d["usage"]["total_tokens"] for d in docs)
    assert q["tokens"]["used"] < estimated  # reserved 200 completion tokens, the model stops by 64
    assert q["requests"]["used"] == 3


async def test_failure_refunds_the_reservation(
    solo: Pipeline,
    solo_worker: WorkerProcess,
    http: aiohttp.ClientSession,
    faults: Callable[..., Awaitable[None]],
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    await faults(error_status=400, fail_next=1)  # a 400 is fatal: fails at once, no retry
    status, accepted, _ = await api.submit({"task": "generate", "input": "fail me", "params": {"max_tokens": 50}})
    assert status == 202
    assert (await quota(api))["tokens"]["reserved"] in (0, accepted["estimated_tokens"])
    doc = await api.wait_status(accepted["request_id"], {"failed", "completed"})
    assert doc["status"] == "failed", doc
    q = await settled_quota(api, "the failure refunded")
    assert q["tokens"] == {"used": 0, "reserved": 0, "limit": 100_000, "remaining": 100_000}
    assert q["requests"]["used"] == 1


async def test_cancel_refunds_the_reservation(
    solo: Pipeline,
    solo_worker: WorkerProcess,
    http: aiohttp.ClientSession,
    faults: Callable[..., Awaitable[None]],
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    await faults(latency_ms=60_000)  # the model call cannot finish before the cancel
    status, accepted, _ = await api.submit({"task": "generate", "input": "cancel me", "params": {"max_tokens": 50}})
    assert status == 202
    rid = accepted["request_id"]
    assert (await quota(api))["tokens"]["reserved"] == accepted["estimated_tokens"]
    status, body, _ = await api.call("DELETE", f"/v1/requests/{rid}")
    assert status == 202, body
    doc = await api.wait_status(rid, {"cancelled", "completed", "failed"})
    assert doc["status"] == "cancelled", doc
    q = await settled_quota(api, "the cancellation refunded")
    assert q["tokens"]["used"] == 0 and q["requests"]["used"] == 1


async def test_a_duplicated_result_event_is_settled_once(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    status, accepted, _ = await api.submit({"task": "generate", "input": "once", "params": {"max_tokens": 20}})
    doc = await api.wait_status(accepted["request_id"], {"completed"})
    before = await settled_quota(api, "the first settlement")
    assert before["tokens"]["used"] == doc["usage"]["total_tokens"] > 0

    duplicate = ResultEvent(
        request_id=doc["request_id"],
        user_id=user,
        status="completed",
        at=time.time(),
        task=doc["task"],
        model=doc["model"],
        priority=doc["priority"],
        estimated_tokens=doc["estimated_tokens"],
        quota_day=time.strftime("%Y-%m-%d", time.gmtime()),
        attempts=doc["attempts"],
        result=doc["result"],
        usage=doc["usage"],
    )
    producer = AIOKafkaProducer(bootstrap_servers=solo.settings.bootstrap_servers)
    await producer.start()
    try:
        for ev in (duplicate, ResultEvent.from_data({**duplicate.asdict(), "status": "failed"})):
            await producer.send_and_wait(
                solo.settings.results_topic, key=orjson.dumps(user), value=ev.to_bytes()
            )
    finally:
        await producer.stop()

    # A later request of the same user follows the duplicates on the same partition: once its
    # settlement shows, the duplicates were processed.
    status, later, _ = await api.submit({"task": "embed", "input": "after the duplicates"})
    later_doc = await api.wait_status(later["request_id"], {"completed"})

    async def later_settled() -> dict[str, Any] | None:
        q = await quota(api)
        return q if q["requests"]["used"] == 2 and q["tokens"]["reserved"] == 0 else None

    after = await wait_for(later_settled, timeout=30, what="the later request settled")
    assert after["tokens"]["used"] == before["tokens"]["used"] + later_doc["usage"]["total_tokens"]


# ---- idempotency, rate limit, keys, priority ----------------------------------------------


async def test_idempotency_key_repeat_and_mismatch(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    body = {"task": "embed", "input": "exactly once"}
    key = {"Idempotency-Key": fresh("idem")}
    first = await api.submit(body, headers=key)
    assert first[0] == 202
    repeats = await asyncio.gather(*(api.submit(body, headers=key) for _ in range(5)))
    for status, answer, headers in repeats:
        assert status == 202 and answer == first[1] and headers["Idempotent-Replayed"] == "true"
        assert headers["Location"] == first[2]["Location"]
    q = await quota(api)
    assert q["requests"]["used"] == 1
    status, err, _ = await api.submit({**body, "input": "something else"}, headers=key)
    assert status == 422 and err["error"]["type"] == "idempotency_key_mismatch", err
    assert (await quota(api))["requests"]["used"] == 1
    # Another key is another request.
    assert (await api.submit(body, headers={"Idempotency-Key": fresh("idem")}))[0] == 202
    assert (await quota(api))["requests"]["used"] == 2


async def test_rate_limit_per_minute(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(
        solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000, requests_per_minute=5
    )

    async def early_in_a_minute() -> bool:  # six quick submissions must not straddle two minutes
        return time.time() % 60 < 45

    await wait_for(early_in_a_minute, timeout=20, interval=0.2, what="the first 45 s of a minute")
    replies = [await api.submit({"task": "embed", "input": f"r{i}"}) for i in range(6)]
    assert [s for s, _, _ in replies] == [202] * 5 + [429]
    status, body, headers = replies[-1]
    assert body["error"]["type"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert body["error"]["requests"] == {"used": 5, "limit": 100}
    assert (await quota(api))["requests"]["used"] == 5


async def test_revoked_key_is_refused_within_5_seconds(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    code, out = await solo.cli("keys", "revoke", api.key or "")
    assert code == 0, out
    revoked_at = time.monotonic()

    async def refused() -> bool:
        return (await api.call("GET", "/v1/quota"))[0] == 401

    await wait_for(refused, timeout=10, interval=0.05, what="the revoked key refused")
    elapsed = time.monotonic() - revoked_at
    assert elapsed < 5, elapsed
    status, body, _ = await api.submit({"task": "embed", "input": "x"})
    assert status == 401 and body["error"]["type"] == "unauthorized"


async def test_priority_above_the_plan_is_capped(
    solo: Pipeline, solo_worker: WorkerProcess, http: aiohttp.ClientSession
) -> None:
    user, (api,) = await user_with_plan(
        solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000, max_priority="low"
    )
    status, accepted, _ = await api.submit({"task": "embed", "input": "urgent!", "priority": "high"})
    assert status == 202, accepted
    doc = await api.wait_status(accepted["request_id"], {"completed"})
    assert doc["priority"] == "low"
    pool = await solo.store.connect()
    row = await pool.fetchrow(
        f'SELECT priority FROM "{solo.settings.db_schema}".requests WHERE request_id = $1',
        accepted["request_id"],
    )
    assert row is not None and row["priority"] == "low"


# ---- quota audit --------------------------------------------------------------------------


async def run_audit(pipeline: Pipeline, user: str) -> tuple[int, str]:
    return await pipeline.cli("quota", "audit", "--user", user)


async def test_quota_audit_agrees_with_the_table_then_finds_a_forged_admission(
    solo: Pipeline,
    solo_worker: WorkerProcess,
    http: aiohttp.ClientSession,
    faults: Callable[..., Awaitable[None]],
) -> None:
    user, (api,) = await user_with_plan(solo, http, [solo_worker.url], requests_per_day=100, tokens_per_day=100_000)
    ids = []
    for body in (
        {"task": "generate", "input": "audit me", "params": {"max_tokens": 30}},
        {"task": "embed", "input": "and me"},
    ):
        status, accepted, _ = await api.submit(body)
        assert status == 202
        ids.append(accepted["request_id"])
    for rid in ids:
        await api.wait_status(rid, {"completed"})
    await faults(error_status=400, fail_next=1)
    status, accepted, _ = await api.submit({"task": "generate", "input": "fails", "params": {"max_tokens": 9}})
    await api.wait_status(accepted["request_id"], {"failed"})
    q = await settled_quota(api, "all settled")

    code, out = await run_audit(solo, user)
    assert code == 0, out
    used, tokens = q["requests"]["used"], q["tokens"]["used"]
    line = f'{{"requests_used":{used},"tokens_used":{tokens},"tokens_reserved":0}}'
    assert f"log:   {line}" in out and f"table: {line}" in out, out
    assert "no difference" in out

    # An admission in the log the table never counted (written around the gateway).
    forged = InferenceRequest(
        request_id="req_" + "0" * 12 + uuid.uuid4().hex[:12],
        user_id=user,
        task="embed",
        model="all-MiniLM-L6-v2",
        input=["forged"],
        estimated_tokens=7,
        created_at=time.time(),
        quota_day=time.strftime("%Y-%m-%d", time.gmtime()),
    )
    producer = AIOKafkaProducer(bootstrap_servers=solo.settings.bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(solo.settings.requests_topic, key=orjson.dumps(user), value=forged.to_bytes())
    finally:
        await producer.stop()
    code, out = await run_audit(solo, user)
    assert code == 1, out
    assert f"DIFFERENCE requests_used: log {used + 1} != table {used}" in out, out


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))
