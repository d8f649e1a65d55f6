"""Queue position, ETA and deadline-aware admission end to end: a slow model, a backlog, then GETs and deadlines.

One worker with 2 model calls at a time and no extra prefetch against a
400 ms model: 40 requests make a backlog of about 8 s. Waiting requests carry
``queue``; a strict ``deadline_s`` under the ETA is refused with 429 and
charges nothing; ``best_effort`` is admitted; a started request has no ``queue``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.pipeline import Api, Pipeline
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

BACKLOG = 40


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1", ml_concurrency="2", ml_prefetch="2") as p:
        yield p


async def quota_used(api: Api) -> tuple[int, int]:
    status, body, _ = await api.call("GET", "/v1/quota")
    assert status == 200, body
    return body["requests"]["used"], body["tokens"]["used"] + body["tokens"]["reserved"]


async def test_waiting_requests_carry_queue_and_unreachable_deadlines_are_refused_for_free(
    pipeline: Pipeline, http: aiohttp.ClientSession, faults: Any
) -> None:
    await pipeline.set_plan("eta", requests_per_day=1000, tokens_per_day=1_000_000)
    worker = await pipeline.start_worker()
    api = await Api(http, worker.url, await pipeline.create_key("etta", plan="eta")).wait_key_active()
    await faults(latency_ms=400)
    ids = []
    for i in range(BACKLOG):
        status, body, _ = await api.submit({"task": "generate", "input": f"q {i}", "params": {"max_tokens": 4}})
        assert status == 202, body
        ids.append(body["request_id"])

    async def last_has_eta() -> dict[str, Any] | None:
        status, doc, _ = await api.get(ids[-1])
        assert status == 200, doc
        queue = doc.get("queue")
        return doc if queue and queue["eta_s"] and queue["eta_s"] > 1.5 else None

    doc = await wait_for(last_has_eta, timeout=20, what="an ETA on the last request of the backlog")
    assert doc["status"] in ("queued", "dispatched")
    assert doc["queue"]["position"] == doc["queue"]["ahead"] + 1 > 3
    _, first, _ = await api.get(ids[0])
    assert "queue" not in first or first["queue"]["ahead"] < doc["queue"]["ahead"]

    before = await quota_used(api)
    body = {"task": "generate", "input": "in a hurry", "params": {"max_tokens": 4}, "deadline_s": 1}
    status, refused, headers = await api.submit(body)
    assert status == 429, refused
    assert refused["error"]["type"] == "deadline_unreachable"
    assert refused["error"]["eta_s"] > 1
    assert refused["error"]["queue"]["ahead"] > 0
    assert int(headers["Retry-After"]) >= 1
    assert await quota_used(api) == before  # charged nothing

    status, admitted, _ = await api.submit({**body, "deadline_policy": "best_effort"})
    assert status == 202, admitted
    status, roomy, _ = await api.submit({**body, "deadline_s": 600})
    assert status == 202, roomy

    # The best-effort one expires in the queue as before (refunded, never run); the rest complete.
    expired = await api.wait_status(admitted["request_id"], {"expired", "completed"}, timeout=60)
    assert expired["status"] == "expired"
    done = await asyncio.gather(*(api.wait_status(rid, {"completed"}, timeout=60) for rid in ids))
    assert all("queue" not in d for d in done)
    await api.wait_status(roomy["request_id"], {"completed"}, timeout=60)
