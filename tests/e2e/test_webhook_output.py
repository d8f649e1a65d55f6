"""``output`` webhooks of a streamed generation: at most one call per 500 ms, each the text so far, signed, then the terminal one."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from bridges.clients.webhooks import standard_secret
from modelserver.generator import complete
from streams.delivery import OUTPUT_INTERVAL_S
from tests.support.listener import loopback_listener
from tests.support.modelserver import running_modelserver
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TOKEN_MS = 40  # a 64-token answer takes about 2.5 s: several output webhooks' worth
PROMPT = next(p for p in (f"tell me a long story {i}" for i in range(400)) if complete(p, 64).completion_tokens == 64)


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


async def test_output_webhooks_are_throttled_prefixes_of_the_result(pipeline: Pipeline, worker: WorkerProcess) -> None:
    calls: list[tuple[float, bytes, dict[str, str]]] = []

    async def receive(request: web.Request) -> web.Response:
        calls.append((time.monotonic(), await request.read(), dict(request.headers)))
        return web.Response(status=200)

    key = await pipeline.create_key("u" + uuid.uuid4().hex[:8])
    async with aiohttp.ClientSession() as http, loopback_listener(receive) as url:
        api = await Api(http, worker.url, key).wait_key_active()
        status, body, _ = await api.submit({
            "task": "generate", "input": PROMPT, "params": {"stream": True, "max_tokens": 64},
            "callback_url": url, "webhook_events": ["output", "completed"],
        })  # fmt: skip
        assert status == 202, body
        rid = body["request_id"]

        def completed() -> bool:
            return any(orjson.loads(b)["status"] == "completed" for _, b, _ in calls)

        await wait_for(completed, timeout=60, what="the completed webhook")
    receiver = Webhook(standard_secret(pipeline.settings.webhook_secret))
    docs = [receiver.verify(b, h) for _, b, h in calls]
    final = next(d for d in docs if d["status"] == "completed")
    outputs = [(t, d, h["webhook-id"]) for (t, _, h), d in zip(calls, docs, strict=True) if d.get("event") == "output"]
    assert len(outputs) >= 3, docs  # about 2.5 s of generation
    times = [t for t, _, _ in outputs]
    # One call per interval (a little slack for the receiver's clock reading, not the sender's).
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= OUTPUT_INTERVAL_S - 0.05, times
    texts = [d["output"]["text"] for _, d, _ in outputs]
    assert all(final["result"]["text"].startswith(t) for t in texts), (texts, final)
    assert texts == sorted(texts, key=len) and len(set(texts)) == len(texts)
    assert all(wid == f"msg_{rid}_output_{d['output']['offset']}" for _, d, wid in outputs)
