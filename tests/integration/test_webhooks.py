"""Webhook deliveries to a real local HTTP receiver: signature, retries with backoff, recorded state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from bridges.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSender,
    sign,
    verify_signature,
)
from inferstream.localbroker import free_port as closed_port
from inferstream.settings import Settings

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"
DOC = {"request_id": "req_w", "status": "completed", "result": {"text": "ok"}}

Recorded = list[tuple[str, str, int, str | None]]
Receiver = Callable[[list[int]], Awaitable[tuple[str, list[web.Request], list[bytes]]]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """Start a receiver answering with the given statuses in turn (the last one repeats)."""
    runners: list[web.AppRunner] = []

    async def start(statuses: list[int]) -> tuple[str, list[web.Request], list[bytes]]:
        seen: list[web.Request] = []
        bodies: list[bytes] = []

        async def hook(request: web.Request) -> web.Response:
            bodies.append(await request.read())
            seen.append(request)
            status = statuses[min(len(seen), len(statuses)) - 1]
            return web.Response(status=status, text="")

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/hook", seen, bodies

    yield start
    for runner in runners:
        await runner.cleanup()


def sender(recorded: Recorded, max_attempts: int = 6) -> WebhookSender:
    async def record(request_id: str, state: str, attempts: int, last_error: str | None) -> None:
        recorded.append((request_id, state, attempts, last_error))

    settings = Settings(webhook_secret=SECRET, webhook_max_attempts=max_attempts)
    return WebhookSender(
        settings, record=record, base_delay_s=0.01, max_delay_s=0.05, timeout_s=2.0
    )


def test_verify_signature() -> None:
    body = orjson.dumps(DOC)
    header = sign(SECRET, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature(SECRET, body, header)
    assert not verify_signature("other-secret", body, header)
    assert not verify_signature(SECRET, body + b" ", header)
    assert not verify_signature(SECRET, body, None)
    assert not verify_signature(SECRET, body, "sha256=" + "0" * 64)


async def test_delivery_is_signed(receiver: Receiver) -> None:
    url, seen, bodies = await receiver([200])
    recorded: Recorded = []
    hooks = sender(recorded)
    try:
        assert await hooks.deliver("req_w", url, DOC) == "delivered"
    finally:
        await hooks.close()
    assert verify_signature(SECRET, bodies[0], seen[0].headers[SIGNATURE_HEADER])
    assert orjson.loads(bodies[0]) == DOC
    assert seen[0].headers["Content-Type"] == "application/json"
    assert abs(int(seen[0].headers[TIMESTAMP_HEADER]) - time.time()) < 60
    assert recorded == [("req_w", "delivered", 1, None)]


async def test_retried_after_two_503s(receiver: Receiver) -> None:
    url, seen, bodies = await receiver([503, 503, 200])
    recorded: Recorded = []
    hooks = sender(recorded)
    try:
        task = hooks.submit("req_w", url, DOC)  # the background path the sink uses
        assert await task == "delivered"
    finally:
        await hooks.close()
    assert len(seen) == 3 and len(set(bodies)) == 1
    assert recorded == [
        ("req_w", "pending", 1, "HTTP 503"),
        ("req_w", "pending", 2, "HTTP 503"),
        ("req_w", "delivered", 3, None),
    ]


async def test_gives_up_after_max_attempts(receiver: Receiver) -> None:
    url, seen, _ = await receiver([429])
    recorded: Recorded = []
    hooks = sender(recorded, max_attempts=3)
    try:
        assert await hooks.deliver("req_w", url, DOC) == "failed"
    finally:
        await hooks.close()
    assert len(seen) == 3
    assert recorded[-1] == ("req_w", "failed", 3, "HTTP 429")


async def test_client_error_fails_at_once(receiver: Receiver) -> None:
    url, seen, _ = await receiver([410])
    recorded: Recorded = []
    hooks = sender(recorded)
    try:
        assert await hooks.deliver("req_w", url, DOC) == "failed"
    finally:
        await hooks.close()
    assert len(seen) == 1
    assert recorded == [("req_w", "failed", 1, "HTTP 410")]


async def test_unreachable_endpoint_is_retried_then_failed() -> None:
    recorded: Recorded = []
    hooks = sender(recorded, max_attempts=2)
    try:
        state = await hooks.deliver("req_w", f"http://127.0.0.1:{closed_port()}/hook", DOC)
    finally:
        await hooks.close()
    assert state == "failed"
    assert [(r[1], r[2]) for r in recorded] == [("pending", 1), ("failed", 2)]
    assert recorded[-1][3] is not None and "Connect" in recorded[-1][3]


async def test_close_waits_for_background_deliveries(receiver: Receiver) -> None:
    url, seen, _ = await receiver([200])
    recorded: Recorded = []
    hooks = sender(recorded)
    docs: list[dict[str, Any]] = [{**DOC, "request_id": f"req_{i}"} for i in range(20)]
    for d in docs:
        hooks.submit(d["request_id"], url, d)
    await hooks.close(timeout_s=5.0)
    assert hooks.in_flight_count == 0
    assert sorted(r[0] for r in recorded if r[1] == "delivered") == sorted(
        d["request_id"] for d in docs
    )
    assert len(seen) == 20
