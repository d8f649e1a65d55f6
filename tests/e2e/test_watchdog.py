"""The watchdog: a request left ``queued`` (in the log and the store, never dispatched) still completes.

The stranded request is made the way a lost offset leaves one: its ``queued``
row is in PostgreSQL, its work message is nowhere. Requests that flow normally
are never dispatched twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from inferstream import clock
from inferstream.ids import new_request_id
from schemas.records import InferenceRequest
from tests.support.pipeline import Api, Pipeline, WorkerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(
        broker_url, model_base_url + "/v1", watchdog_stall_s="2", watchdog_interval_s="0.5"
    ) as p:
        yield p


async def redispatched(http: aiohttp.ClientSession, worker: WorkerProcess) -> float:
    return await worker.metric(http, "inferstream_watchdog_redispatched_total")


async def test_a_stranded_request_completes_and_normal_ones_run_once(
    pipeline: Pipeline, http: aiohttp.ClientSession
) -> None:
    worker = await pipeline.start_worker()
    api = await Api(http, worker.url, await pipeline.create_key("wendy")).wait_key_active()
    normal = []
    for i in range(5):
        status, body, _ = await api.submit({"task": "generate", "input": f"normal {i}", "params": {"max_tokens": 4}})
        assert status == 202, body
        normal.append(body["request_id"])
    for rid in normal:
        await api.wait_status(rid, {"completed"})

    now = clock.now() - 30  # admitted half a minute ago; its offset was lost
    stranded = InferenceRequest(
        request_id=new_request_id(now), user_id="wendy", task="generate", model="sim-gpt",
        input=["stranded"], estimated_tokens=10, created_at=now, quota_day=clock.utc_day(now),
        params={"max_tokens": 4},
    )  # fmt: skip
    await pipeline.store.requests.upsert_events([stranded])
    doc = await api.wait_status(stranded.request_id, {"completed"}, timeout=60)
    assert doc["result"]["text"]
    # Sweeps ran every 0.5 s meanwhile, with the normal requests 2 s past admission: none was re-sent.
    assert await redispatched(http, worker) == 1.0

