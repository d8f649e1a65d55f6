"""Webhook deliveries to a real local HTTP receiver: signature, retries with backoff, recorded state."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bridges.clients.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Attempt,
    WebhookSender,
    sign,
    standard_secret,
    verify_signature,
)
from devtools.localbroker import free_port as closed_port
from inferstream.settings import Settings
from tests.support.listener import loopback_listener

pytestmark = pytest.mark.integration
SECRET = "test-webhook-secret"
DOC = {"request_id": "req_w", "status": "completed", "result": {"text": "ok"}}

Recorded = list[tuple[str, str, int, str | None]]
Receiver = Callable[[list[int]], Awaitable[tuple[str, list[web.Request], list[bytes]]]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """Start a receiver answering with the given statuses in turn (the last one repeats)."""

    async def start(statuses: list[int]) -> tuple[str, list[web.Request], list[bytes]]:
        seen: list[web.Request] = []
        bodies: list[bytes] = []

        async def hook(request: web.Request) -> web.Response:
            bodies.append(await request.read())
            seen.append(request)
            status = statuses[min(len(seen), len(statuses)) - 1]
            return web.Response(status=status, text="")

        url = await listeners.enter_async_context(loopback_listener(hook))
        return url, seen, bodies

    async with contextlib.AsyncExitStack() as listeners:
        yield start


LOOPBACK = "127.0.0.0/8,::1,localhost"


def sender(
    recorded: Recorded,
    max_attempts: int = 6,
    allow: str = LOOPBACK,
    resolver: AbstractResolver | None = None,
) -> WebhookSender:
    """A sender allowed to reach loopback (where these tests' receivers listen) unless told otherwise."""

    async def record(a: Attempt) -> None:
        recorded.append((a.request_id, a.state, a.attempt, a.error))

    settings = Settings(
        webhook_secret=SECRET, webhook_max_attempts=max_attempts, webhook_allow=allow
    )
    return WebhookSender(
        settings,
        record=record,
        resolver=resolver,
        base_delay_s=0.01,
        max_delay_s=0.05,
        timeout_s=2.0,
    )


class RebindingResolver(AbstractResolver):
    """DNS that answers every name with one address (here: loopback, where a receiver listens)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


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


async def test_standard_webhooks_signature_verifies_and_the_id_is_stable_across_retries(
    receiver: Receiver,
) -> None:
    """A receiver using the ``standardwebhooks`` package accepts every attempt; retries keep the id."""
    url, seen, bodies = await receiver([503, 200])
    attempts: list[Attempt] = []

    async def record(a: Attempt) -> None:
        attempts.append(a)

    settings = Settings(webhook_secret=SECRET, webhook_allow=LOOPBACK)
    hooks = WebhookSender(settings, record=record, base_delay_s=0.01, max_delay_s=0.05, timeout_s=2.0)
    try:
        assert await hooks.deliver("req_w", url, DOC) == "delivered"
    finally:
        await hooks.close()
    receiver_side = Webhook(standard_secret(SECRET))
    for request, body in zip(seen, bodies, strict=True):
        assert receiver_side.verify(body, dict(request.headers)) == DOC
        assert verify_signature(SECRET, body, request.headers[SIGNATURE_HEADER])  # the old header stays
    assert {r.headers["webhook-id"] for r in seen} == {"msg_req_w_completed"}
    assert [(a.event, a.state, a.attempt, a.http_status) for a in attempts] == [
        ("completed", "pending", 1, 503), ("completed", "delivered", 2, None),
    ]  # fmt: skip
    with pytest.raises(WebhookVerificationError):
        Webhook(standard_secret("another-secret")).verify(bodies[0], dict(seen[0].headers))


async def test_an_output_event_is_tried_once(receiver: Receiver) -> None:
    url, seen, _ = await receiver([503])
    recorded: Recorded = []
    hooks = sender(recorded)
    try:
        doc = {"request_id": "req_w", "status": "running", "event": "output", "output": {"text": "a", "offset": 0}}
        assert await hooks.deliver("req_w", url, doc, event="output", webhook_id="msg_req_w_output_0", retry=False) == "failed"
    finally:
        await hooks.close()
    assert len(seen) == 1 and seen[0].headers["webhook-id"] == "msg_req_w_output_0"
    assert recorded == [("req_w", "failed", 1, "HTTP 503")]


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


@pytest.mark.parametrize(
    "spelling",
    [
        "http://127.0.0.1:{port}/hook",
        "http://localhost:{port}/hook",
        "http://[::ffff:127.0.0.1]:{port}/hook",
        "http://0x7f.1:{port}/hook",
        "http://0177.0.0.1:{port}/hook",
        "http://2130706433:{port}/hook",
        "http://127.1:{port}/hook",
    ],
)
async def test_loopback_receiver_gets_nothing_without_an_allow_entry(
    receiver: Receiver, spelling: str
) -> None:
    url, seen, _ = await receiver([200])
    port = url.split(":")[2].split("/")[0]
    recorded: Recorded = []
    hooks = sender(recorded, allow="")
    try:
        state = await hooks.deliver("req_w", spelling.format(port=port), DOC)
    finally:
        await hooks.close()
    assert seen == []
    assert state == "failed"
    # Refused for good at once (no retry would ever be allowed), with the reason recorded.
    assert len(recorded) == 1 and recorded[0][:3] == ("req_w", "failed", 1)
    assert recorded[0][3] is not None and "refused" in recorded[0][3]


async def test_redirects_are_not_followed(receiver: Receiver) -> None:
    target, seen, _ = await receiver([200])

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    recorded: Recorded = []
    hooks = sender(recorded)
    try:
        async with loopback_listener(bounce) as url:
            assert await hooks.deliver("req_w", url, DOC) == "failed"
    finally:
        await hooks.close()
    assert seen == []
    assert recorded == [("req_w", "failed", 1, "HTTP 307")]


async def test_an_endless_response_body_is_not_read() -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200)
        await resp.prepare(request)
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):  # 6.5 GB if anyone read it all
                await resp.write(chunk)
        return resp

    recorded: Recorded = []
    hooks = sender(recorded)
    started = time.monotonic()
    try:
        async with loopback_listener(endless) as url:
            assert await hooks.deliver("req_w", url, DOC) == "delivered"
    finally:
        await hooks.close()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("allow", "expected"), [("", "failed"), ("127.0.0.0/8", "delivered")])
async def test_a_name_is_checked_on_the_address_it_connects_to(
    receiver: Receiver, allow: str, expected: str
) -> None:
    """DNS rebinding: a public-looking name that resolves to loopback when the delivery connects."""
    url, seen, _ = await receiver([200])
    port = url.split(":")[2].split("/")[0]
    dns = RebindingResolver("127.0.0.1")
    recorded: Recorded = []
    hooks = sender(recorded, allow=allow, resolver=dns)
    try:
        state = await hooks.deliver("req_w", f"http://hooks.example.com:{port}/hook", DOC)
    finally:
        await hooks.close()
    assert dns.asked == ["hooks.example.com"]
    assert state == expected
    assert len(seen) == (1 if expected == "delivered" else 0)
    if expected == "failed":
        assert recorded == [
            (
                "req_w",
                "failed",
                1,
                "callback_url host 'hooks.example.com' (127.0.0.1) refused: loopback address",
            )
        ]
