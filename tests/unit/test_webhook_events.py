"""Which events a request's webhooks carry, the ``output`` throttle, and Standard Webhooks signatures (verified as a receiver would)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from bridges.clients.store.rows import collapse, wants_event
from bridges.clients.webhooks import message_id, standard_key, standard_secret, standard_signature
from schemas.records import InferenceRequest, ResultEvent
from streams import delivery as delivery_mod
from streams.delivery import Delivery
from tests.support.wait import wait_for


class FakeSender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str, str | None, bool]] = []

    def submit(self, request_id: str, url: str, doc: Mapping[str, Any], *, event: str | None = None,
               webhook_id: str | None = None, retry: bool = True) -> None:  # fmt: skip
        self.sent.append((request_id, dict(doc), event or str(doc["status"]), webhook_id, retry))


class FakeRecords:
    def __init__(self, target: dict[str, Any] | None) -> None:
        self.target = target
        self.lookups = 0

    async def webhook_target(self, request_id: str) -> dict[str, Any] | None:
        self.lookups += 1
        return self.target


def delivery(target: dict[str, Any] | None = None) -> tuple[Delivery, FakeSender, FakeRecords]:
    sender, records = FakeSender(), FakeRecords(target)
    return Delivery(None, sender, records), sender, records  # type: ignore[arg-type]


def test_default_is_terminal_only() -> None:
    assert wants_event(None, "completed") and wants_event(None, "expired")
    assert not wants_event(None, "running") and not wants_event(None, "output")
    assert wants_event(["running"], "running") and not wants_event(["running"], "completed")
    assert wants_event('["output"]', "output")  # a jsonb column read as text


def _req(events: list[str] | None) -> InferenceRequest:
    return InferenceRequest(
        request_id="req_" + "a" * 24, user_id="u", task="generate", model="m", input=["hi"],
        created_at=time.time(), callback_url="https://example.test/h", webhook_events=events,
        estimated_tokens=10, quota_day="2026-12-01",
    )  # fmt: skip


@pytest.mark.parametrize(("events", "due"), [(None, True), (["completed"], True), (["running", "output"], False)])
def test_terminal_delivery_is_due_only_when_asked_for(events: list[str] | None, due: bool) -> None:
    req = _req(events)
    done = ResultEvent.for_request(req, status="completed", at=time.time() + 1)
    (row,) = collapse([req, done])
    assert row.get("webhook_events") == events
    assert (row.get("webhook_state") == "pending") is due


async def test_output_is_throttled_and_the_latest_text_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_mod, "OUTPUT_INTERVAL_S", 0.2)
    d, sender, records = delivery({"callback_url": "https://example.test/h", "webhook_events": ["output"]})
    rid = "req_" + "b" * 24
    await d.on_output("u", rid, "a", 0)
    await d.on_output("u", rid, "ab", 1)
    await d.on_output("u", rid, "abc", 2)
    assert [s[1]["output"] for s in sender.sent] == [{"text": "a", "offset": 0}]
    await wait_for(lambda: len(sender.sent) == 2, timeout=2, what="the trailing output webhook")
    assert sender.sent[1][1]["output"] == {"text": "abc", "offset": 2}
    assert sender.sent[1][2:] == ("output", message_id(rid, "output", 2), False)
    assert records.lookups == 1  # the target is read once per request


async def test_output_not_asked_for_sends_nothing() -> None:
    d, sender, records = delivery({"callback_url": "https://example.test/h", "webhook_events": None})
    for i in range(5):
        await d.on_output("u", "req_" + "c" * 24, "x" * i, i)
    assert sender.sent == [] and records.lookups == 1
    await d.on_output("u", "req_" + "d" * 24, "x", 0, callback_url="https://example.test/h",
                      webhook_events=["output"], known=True)  # fmt: skip
    assert len(sender.sent) == 1 and records.lookups == 1


async def test_on_delta_puts_the_text_together_and_reads_redis_only_after_a_gap() -> None:
    d, sender, _ = delivery({"callback_url": "https://example.test/h", "webhook_events": ["output"]})
    reads: list[str] = []

    async def so_far(request_id: str) -> str:
        reads.append(request_id)
        return "resumed text"

    await d.on_delta("req_" + "f" * 24, "ab", 0, so_far)
    assert sender.sent[-1][1]["output"] == {"text": "ab", "offset": 0} and reads == []
    await d.on_delta("req_" + "9" * 24, "text", 8, so_far)  # began elsewhere: a redelivery
    assert sender.sent[-1][1]["output"] == {"text": "resumed text", "offset": 8} and len(reads) == 1


async def test_a_row_not_written_yet_is_read_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_mod, "OUTPUT_INTERVAL_S", 0.05)
    d, sender, records = delivery(None)
    rid = "req_" + "8" * 24
    await d.on_output("u", rid, "a", 0)
    await d.on_output("u", rid, "ab", 1)
    assert records.lookups == 1 and sender.sent == []
    records.target = {"callback_url": "https://example.test/h", "webhook_events": ["output"]}
    t0 = time.monotonic()
    await wait_for(lambda: time.monotonic() - t0 > 0.06, timeout=1, what="the interval to pass")
    await d.on_output("u", rid, "abc", 2)
    assert records.lookups == 2 and len(sender.sent) == 1


async def test_a_terminal_row_stops_pending_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_mod, "OUTPUT_INTERVAL_S", 0.2)
    d, sender, _ = delivery({"callback_url": "https://example.test/h", "webhook_events": ["output", "completed"]})
    rid = "req_" + "e" * 24
    await d.on_output("u", rid, "a", 0)
    await d.on_output("u", rid, "ab", 1)  # waits for the timer
    d._end_output(rid)
    assert rid not in d._outputs
    assert len(sender.sent) == 1


def test_standard_signature_verifies_with_the_reference_library() -> None:
    body = orjson.dumps({"request_id": "req_x", "status": "completed"})
    ts = int(time.time())
    for secret in ("plain-secret", standard_secret("another")):
        sig = standard_signature(standard_key(secret), "msg_req_x_completed", ts, body)
        headers = {"webhook-id": "msg_req_x_completed", "webhook-timestamp": str(ts), "webhook-signature": sig}
        assert Webhook(standard_secret(secret)).verify(body, headers) == {"request_id": "req_x", "status": "completed"}
    assert standard_secret(standard_secret("k")) == standard_secret("k")  # a whsec_ secret is used as given
