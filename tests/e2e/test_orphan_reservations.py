"""A reservation whose request never reached the log (a crash between charge and write) is released; one that arrives late is charged once.

The crash is not raced: the changelog record a kill -9 leaves behind (a
pending reservation, its request not in the log) is written before the worker
starts, so the worker recovers it as it would after a real crash.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from inferstream import clock
from inferstream.ids import new_request_id
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ORPHAN_USER = "orphan-" + uuid.uuid4().hex[:6]
LATE_USER = "late-" + uuid.uuid4().hex[:6]
ORPHAN_ID = new_request_id(clock.now())
LATE_ID = new_request_id(clock.now())
RESERVED = 7
SUBMITTED = 3


def crashed_state(request_id: str, created_at: float) -> dict[str, Any]:
    """A user's quota state as a kill -9 after the reservation's ack and before the request's write leaves it."""
    return {
        "day": clock.utc_day(created_at),
        "requests_used": 1,
        "tokens_used": 0,
        "tokens_reserved": RESERVED,
        "minute": int(created_at // 60),
        "minute_count": 1,
        "pending": {str(int(created_at)): [1, RESERVED]},
        "confirmed_upto": 0.0,
        "confirmed_offset": -1,
        "released": {},
        "orphaned": {},
        "settled_upto": -1,
    }


def request_record(request_id: str, user: str, created_at: float) -> dict[str, Any]:
    """The requests topic's value, as the gateway writes it (``InferenceRequest``)."""
    return {
        "request_id": request_id, "user_id": user, "task": "embed", "model": "all-MiniLM-L6-v2",
        "input": ["arrived after all"], "estimated_tokens": RESERVED, "created_at": created_at,
        "quota_day": clock.utc_day(created_at), "priority": "normal", "params": {}, "deadline_at": None,
        "metadata": {}, "callback_url": None, "input_is_list": False,
    }  # fmt: skip


async def produce(servers: list[str], topic: str, key: str, value: dict[str, Any]) -> None:
    # Keys and values as the app's JSON serializers write them; the default partitioner, as the app's.
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps(value), key=orjson.dumps(key))
    finally:
        await producer.stop()


async def create_changelog(servers: list[str], topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})]
        )
    finally:
        await admin.close()


class Crashed:
    def __init__(self, pipeline: Pipeline, worker: WorkerProcess, keys: dict[str, str]) -> None:
        self.pipeline, self.worker, self.keys = pipeline, worker, keys
        self.created_at: dict[str, float] = {}


@pytest.fixture(scope="module")
async def crashed(broker_url: str, model_base_url: str) -> AsyncIterator[Crashed]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", admission_timeout_s="1", orphan_reservation_s="5"
    ) as p:
        changelog = f"{p.namespace}-quota-changelog"
        await create_changelog(p.settings.bootstrap_servers, changelog, p.settings.partitions)
        now = clock.now()
        for user, rid in ((ORPHAN_USER, ORPHAN_ID), (LATE_USER, LATE_ID)):
            await produce(p.settings.bootstrap_servers, changelog, user, crashed_state(rid, now))
        keys = {user: await p.create_key(user) for user in (ORPHAN_USER, LATE_USER)}
        crashed = Crashed(p, await p.start_worker(), keys)
        crashed.created_at = {ORPHAN_USER: now, LATE_USER: now}
        yield crashed


async def quota(api: Api) -> dict[str, Any]:
    status, body, _ = await api.call("GET", "/v1/quota")
    assert status == 200, body
    return dict(body)


async def submit_and_complete(api: Api, n: int) -> list[str]:
    ids: list[str] = []

    async def admitted() -> bool:
        # 503 is a legitimate answer with a 1 s admission timeout on a busy machine: ask again.
        status, body, _ = await api.submit({"task": "embed", "input": f"after the crash {len(ids)}"})
        if status == 202:
            ids.append(body["request_id"])
        else:
            assert status == 503, (status, body)
        return len(ids) == n

    await wait_for(admitted, timeout=60, interval=0.1, what=f"{n} admissions")
    for rid in ids:
        await api.wait_status(rid, {"completed"}, timeout=60)
    return ids


async def audit_agrees(pipeline: Pipeline, user: str) -> str:
    code, out = await pipeline.cli("quota", "audit", "--user", user)
    assert code == 0 and "no difference" in out, out
    return out


async def orphans_released(http: aiohttp.ClientSession, worker: WorkerProcess) -> float:
    return await worker.metric(http, "inferstream_quota_orphans_released_total")


async def test_an_orphaned_reservation_is_released(crashed: Crashed, http: aiohttp.ClientSession) -> None:
    api = await Api(http, crashed.worker.url, crashed.keys[ORPHAN_USER]).wait_key_active()
    await submit_and_complete(api, SUBMITTED)

    seen: list[dict[str, Any]] = []

    async def given_back() -> dict[str, Any] | None:
        seen[:] = [await quota(api)]
        q = seen[0]
        return q if q["tokens"]["reserved"] == 0 and q["requests"]["used"] == SUBMITTED else None

    try:
        q = await wait_for(given_back, timeout=60, interval=0.2, what="the orphan released")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; GET /v1/quota: requests {seen[0]['requests']}, tokens {seen[0]['tokens']}") from None
    # Exactly the requests in the log are counted: the orphan's request and tokens were given back.
    assert q["requests"]["used"] == SUBMITTED and q["tokens"]["used"] > 0
    assert await orphans_released(http, crashed.worker) >= 1
    await audit_agrees(crashed.pipeline, ORPHAN_USER)


async def test_a_pending_request_that_arrives_is_charged_once(
    crashed: Crashed, http: aiohttp.ClientSession
) -> None:
    api = await Api(http, crashed.worker.url, crashed.keys[LATE_USER]).wait_key_active()
    p = crashed.pipeline
    # Written by the gateway that crashed, just before it died: the log holds it after all.
    record = request_record(LATE_ID, LATE_USER, crashed.created_at[LATE_USER])
    await produce(p.settings.bootstrap_servers, p.settings.requests_topic, LATE_USER, record)
    late = await api.wait_status(LATE_ID, {"completed"}, timeout=60)
    (later,) = await submit_and_complete(api, 1)
    usage = late["usage"]["total_tokens"] + (await api.wait_status(later, {"completed"}))["usage"]["total_tokens"]

    async def settled() -> dict[str, Any] | None:
        q = await quota(api)
        return q if q["tokens"]["reserved"] == 0 else None

    q = await wait_for(settled, timeout=60, interval=0.2, what="every reservation settled")
    # A sweep in between (if it released the pending entry first) must not make it free or count it twice.
    assert q["requests"]["used"] == 2 and q["tokens"]["used"] == usage > 0, q
    await audit_agrees(p, LATE_USER)
