"""Streamed output end to end: deltas reach the event stream, a resume mid-stream, a cancel mid-stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from modelserver.generator import complete
from tests.support.modelserver import running_modelserver
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.sse import frames
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TOKEN_MS = 40  # the model's pause between chunks: a 64-token answer takes about 2.5 s
# Prompts whose simulated answer runs to the full 64 tokens: long enough to act mid-stream.
LONG = [p for p in (f"tell me a long story {i}" for i in range(400)) if complete(p, 64).completion_tokens == 64]
TERMINAL = {"completed", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
async def model_url() -> AsyncIterator[str]:
    async with running_modelserver("--no-embeddings", "--token-latency-ms", str(TOKEN_MS)) as url:
        yield url


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_url + "/v1", models="generate:sim-gpt") as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture
async def api(pipeline: Pipeline, worker: WorkerProcess) -> AsyncIterator[Api]:
    user = "u" + uuid.uuid4().hex[:8]
    key = await pipeline.create_key(user)
    async with aiohttp.ClientSession() as http:
        yield await Api(http, worker.url, key).wait_key_active()


def sort_key(event_id: str) -> tuple[int, int]:
    rank, _, end = event_id.partition(".")
    return int(rank), int(end or 0)


@dataclass
class Stream:
    events: list[dict[str, Any]] = field(default_factory=list)

    def outputs(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == "output"]

    def text(self) -> str:
        return "".join(o["delta"] for o in self.outputs())


async def follow(
    api: Api, rid: str, *, last_event_id: str | None = None, outputs: int | None = None
) -> Stream:
    """Read the request's event stream until its terminal event (or ``outputs`` output events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    out = Stream()
    url = f"{api.base_url}/v1/requests/{rid}/events"
    async with api.http.get(url, headers=api.headers(headers), timeout=aiohttp.ClientTimeout(total=60)) as r:
        assert r.status == 200
        async for event in frames(r.content):  # ids stay strings: output ids are `3.<end>`
            out.events.append(event)
            if outputs is not None and len(out.outputs()) >= outputs:
                break
            if out.events[-1]["event"] in TERMINAL:
                break
    return out


def assert_contiguous(outputs: list[dict[str, Any]], start: int = 0) -> None:
    at = start
    for o in outputs:
        assert o["offset"] == at, outputs  # no gap, no overlap
        assert o["delta"]
        at += len(o["delta"])


async def submit(api: Api, prompt: str, **params: Any) -> str:
    status, body, _ = await api.submit(
        {"task": "generate", "input": prompt, "params": {"stream": True, "max_tokens": 64, **params}}
    )
    assert status == 202, body
    rid: str = body["request_id"]
    return rid


async def text_so_far(pipeline: Pipeline, rid: str) -> str:
    redis = aioredis.Redis.from_url(pipeline.settings.redis_url)
    try:
        raw = await redis.get(f"{pipeline.namespace}:out:{rid}")
    finally:
        await redis.aclose()
    return "" if raw is None else raw.decode()


async def test_each_delta_reaches_the_stream_in_order_and_adds_up_to_the_result(api: Api) -> None:
    prompt = LONG[0]
    rid = await submit(api, prompt)
    stream = await follow(api, rid)
    assert stream.events[-1]["event"] == "completed", stream.events
    ids = [sort_key(e["id"]) for e in stream.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # increasing: output between running and terminal
    assert all(3 <= sort_key(e["id"])[0] < 4 for e in stream.events if e["event"] == "output")
    outputs = stream.outputs()
    assert len(outputs) > 1, orjson.dumps(stream.events).decode()  # word by word, not the whole text at the end
    assert_contiguous(outputs)
    doc = stream.events[-1]["data"]
    expected = complete(prompt, 64)
    assert stream.text() == doc["result"]["text"] == expected.text
    # Usage is the model's, as for an unstreamed call.
    assert doc["usage"]["completion_tokens"] == expected.completion_tokens
    assert doc["usage"]["total_tokens"] == expected.total_tokens


async def test_a_stream_resumed_mid_generation_gets_the_text_so_far_once_then_the_live_deltas(
    api: Api, pipeline: Pipeline
) -> None:
    prompt = LONG[1]
    rid = await submit(api, prompt)
    first = await follow(api, rid, outputs=3)
    assert_contiguous(first.outputs())
    last_id = first.events[-1]["id"]
    seen = sort_key(last_id)[1]
    assert seen == len(first.text())

    # Let more text arrive while no client listens, then resume.
    await wait_for(lambda: text_so_far(pipeline, rid), timeout=10, what="text so far")
    await wait_for(
        lambda: _longer(pipeline, rid, seen + 20), timeout=10, what="more text while disconnected"
    )
    resumed = await follow(api, rid, last_event_id=last_id)
    outputs = resumed.outputs()
    assert resumed.events[0]["event"] == "output", resumed.events  # nothing it has seen is sent again
    assert outputs[0]["offset"] == seen and len(outputs[0]["delta"]) >= 20  # what it missed, in one event
    assert_contiguous(outputs, start=seen)
    assert resumed.events[-1]["event"] == "completed"
    assert first.text() + resumed.text() == resumed.events[-1]["data"]["result"]["text"]

    # A new stream of a finished request: the document carries the whole text.
    late = await follow(api, rid)
    assert [e["event"] for e in late.events] == ["completed"]


async def _longer(pipeline: Pipeline, rid: str, chars: int) -> bool:
    return len(await text_so_far(pipeline, rid)) >= chars


async def test_a_new_stream_mid_generation_starts_with_the_state_then_all_the_text_so_far(
    api: Api, pipeline: Pipeline
) -> None:
    prompt = LONG[2]
    rid = await submit(api, prompt)
    await wait_for(lambda: _longer(pipeline, rid, 30), timeout=10, what="some text")
    stream = await follow(api, rid)
    assert stream.events[0]["event"] in {"dispatched", "running"}, stream.events
    outputs = stream.outputs()
    assert outputs[0]["offset"] == 0 and len(outputs[0]["delta"]) >= 30
    assert_contiguous(outputs)
    assert stream.text() == stream.events[-1]["data"]["result"]["text"] == complete(prompt, 64).text


async def test_cancel_mid_stream_stops_the_model_call_and_refunds(api: Api, model_url: str) -> None:
    async with api.http.get(f"{model_url}/admin/stats") as r:
        before = await r.json()
    status, quota_before, _ = await api.call("GET", "/v1/quota")
    assert status == 200
    rid = await submit(api, LONG[3])
    stream_task = asyncio.ensure_future(follow(api, rid))
    await wait_for(lambda: _outputs_seen(api, rid), timeout=15, what="output under way")
    status, body, _ = await api.call("DELETE", f"/v1/requests/{rid}")
    assert status == 202, body
    stream = await stream_task
    assert stream.events[-1]["event"] == "cancelled", stream.events
    assert_contiguous(stream.outputs())
    assert 0 < len(stream.text()) < len(complete(LONG[3], 64).text)

    async def aborted() -> bool:
        async with api.http.get(f"{model_url}/admin/stats") as r:
            stats = await r.json()
        return bool(stats["streams_aborted"] > before["streams_aborted"])

    await wait_for(aborted, timeout=10, what="the model call to stop")
    async with api.http.get(f"{model_url}/admin/stats") as r:
        after = await r.json()
    assert after["streams_completed"] == before["streams_completed"]  # it never ran to the end

    async def refunded() -> dict[str, Any] | None:
        _, q, _ = await api.call("GET", "/v1/quota")
        return q if q["tokens"]["reserved"] == quota_before["tokens"]["reserved"] else None

    q = await wait_for(refunded, timeout=30, what="the reservation refunded")
    assert q["tokens"]["used"] == quota_before["tokens"]["used"]  # nothing charged for the cut-off text
    assert q["requests"]["used"] == quota_before["requests"]["used"] + 1


async def _outputs_seen(api: Api, rid: str) -> bool:
    status, doc, _ = await api.get(rid)
    return status == 200 and doc["status"] in {"running", "dispatched"} and await _has_text(api, rid)


async def _has_text(api: Api, rid: str) -> bool:
    stream = await follow(api, rid, outputs=1)
    return bool(stream.outputs())
