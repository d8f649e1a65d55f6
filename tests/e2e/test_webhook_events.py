"""Webhook events end to end on a real worker: the statuses asked for, Standard Webhooks signatures, the attempts list, redelivery."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from bridges.clients.webhooks import SIGNATURE_HEADER, standard_secret, verify_signature
from tests.support.listener import loopback_listener
from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

Calls = list[tuple[bytes, dict[str, str]]]


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        yield p


@pytest.fixture(scope="module")
async def worker(pipeline: Pipeline) -> WorkerProcess:
    return await pipeline.start_worker()


@pytest.fixture
async def alice(http: aiohttp.ClientSession, pipeline: Pipeline, worker: WorkerProcess) -> Api:
    return await Api(http, worker.url, await pipeline.create_key("alice")).wait_key_active()


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, Calls]]:
    calls: Calls = []

    async def receive(request: web.Request) -> web.Response:
        calls.append((await request.read(), dict(request.headers)))
        return web.Response(status=200)

    async with loopback_listener(receive) as url:
        yield url, calls


def events_of(calls: Calls) -> list[str]:
    return [orjson.loads(body)["status"] for body, _ in calls]


async def test_asked_for_statuses_are_delivered_signed_listed_and_redelivered(
    alice: Api, pipeline: Pipeline, hook: tuple[str, Calls], http: aiohttp.ClientSession, worker: WorkerProcess
) -> None:
    url, calls = hook
    status, accepted, _ = await alice.submit(
        {"task": "embed", "input": "tell me", "callback_url": url, "webhook_events": ["dispatched", "completed"]}
    )
    assert status == 202, accepted
    rid = accepted["request_id"]
    await wait_for(lambda: {"dispatched", "completed"} <= set(events_of(calls)), timeout=45, what="both webhooks")
    receiver = Webhook(standard_secret(pipeline.settings.webhook_secret))
    for body, headers in calls:
        assert receiver.verify(body, headers)["request_id"] == rid
        assert verify_signature(pipeline.settings.webhook_secret, body, headers[SIGNATURE_HEADER])
    ids = {orjson.loads(body)["status"]: headers["webhook-id"] for body, headers in calls}
    assert ids == {"dispatched": f"msg_{rid}_dispatched", "completed": f"msg_{rid}_completed"}

    async def listed() -> list[dict[str, Any]] | None:
        code, body, _ = await alice.call("GET", f"/v1/requests/{rid}/webhooks")
        assert code == 200, body
        return body["data"] if len(body["data"]) >= 2 else None

    attempts = await wait_for(listed, timeout=10, what="both attempts listed")
    assert {(a["event"], a["state"], a["http_status"]) for a in attempts} == {
        ("dispatched", "delivered", None), ("completed", "delivered", None),
    }  # fmt: skip
    assert all(a["at"] and a["error"] is None and a["attempt"] == 1 for a in attempts)

    bob = await Api(http, worker.url, await pipeline.create_key("bob")).wait_key_active()
    assert (await bob.call("GET", f"/v1/requests/{rid}/webhooks"))[0] == 404
    assert (await bob.call("POST", f"/v1/requests/{rid}/webhooks/redeliver"))[0] == 404

    before = len(calls)
    code, body, _ = await alice.call("POST", f"/v1/requests/{rid}/webhooks/redeliver")
    assert code == 202, body
    assert body == {"request_id": rid, "event": "completed", "webhook_id": f"msg_{rid}_completed"}
    await wait_for(lambda: len(calls) > before, timeout=10, what="the redelivery")
    again_body, again_headers = calls[-1]
    assert again_headers["webhook-id"] == f"msg_{rid}_completed"  # the receiver can tell it is the same event
    assert receiver.verify(again_body, again_headers)["status"] == "completed"


async def test_default_is_terminal_only_and_redeliver_needs_a_callback(
    alice: Api, pipeline: Pipeline, hook: tuple[str, Calls]
) -> None:
    url, calls = hook
    status, accepted, _ = await alice.submit({"task": "embed", "input": "only the end", "callback_url": url})
    assert status == 202, accepted
    await wait_for(lambda: calls, timeout=45, what="the terminal webhook")
    await alice.wait_status(accepted["request_id"], {"completed"})
    assert events_of(calls) == ["completed"]

    status, plain, _ = await alice.submit({"task": "embed", "input": "no callback"})
    assert status == 202, plain
    await alice.wait_status(plain["request_id"], {"completed"})
    code, body, _ = await alice.call("POST", f"/v1/requests/{plain['request_id']}/webhooks/redeliver")
    assert code == 409 and body["error"]["type"] == "conflict", body
    code, body, _ = await alice.call("GET", f"/v1/requests/{plain['request_id']}/webhooks")
    assert code == 200 and body == {"data": []}
