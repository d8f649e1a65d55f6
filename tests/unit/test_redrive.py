"""Redrive: a dead letter becomes a fresh request linked to the old one, written to the log before it is marked."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from inferstream import clock
from inferstream.ids import is_request_id
from inferstream.settings import Settings
from schemas.records import InferenceRequest
from streams.commands import redrive
from streams.commands.redrive import describe, redrive_letters, resubmission

NOW = datetime(2025, 3, 15, 9, 0, tzinfo=UTC).timestamp()
CREATED = NOW - 86_400 - 30  # yesterday


def old_request(**overrides: Any) -> InferenceRequest:
    fields: dict[str, Any] = {
        "request_id": "req_old",
        "user_id": "alice",
        "task": "generate",
        "model": "sim-gpt",
        "input": ["hello"],
        "estimated_tokens": 40,
        "created_at": CREATED,
        "quota_day": clock.utc_day(CREATED),
        "priority": "high",
        "params": {"max_tokens": 32},
        "deadline_at": CREATED + 600,
        "metadata": {"trace": "t-1"},
        "callback_url": "https://example.com/hook",
        "input_is_list": True,
    }
    return InferenceRequest(**{**fields, **overrides})


def dead_letter(req: InferenceRequest, **extra: Any) -> dict[str, Any]:
    return {"request_id": req.request_id, "user_id": req.user_id, "payload": req.asdict(), **extra}


def test_a_resubmission_is_a_new_request_of_today_linked_to_the_old_one() -> None:
    old = old_request()
    new = resubmission(dead_letter(old), NOW)
    assert new.request_id != old.request_id and is_request_id(new.request_id)
    assert (new.created_at, new.quota_day) == (NOW, clock.utc_day(NOW))
    assert new.metadata == {"trace": "t-1", "redrive_of": "req_old"}
    # The deadline keeps its length, counted from now.
    assert new.deadline_at == pytest.approx(NOW + 600)
    kept = (
        "user_id",
        "task",
        "model",
        "input",
        "estimated_tokens",
        "priority",
        "params",
        "callback_url",
        "input_is_list",
    )
    assert {k: getattr(new, k) for k in kept} == {k: getattr(old, k) for k in kept}


def test_a_request_without_deadline_or_metadata_stays_without_a_deadline() -> None:
    new = resubmission(dead_letter(old_request(deadline_at=None, metadata=None)), NOW)
    assert new.deadline_at is None and new.metadata == {"redrive_of": "req_old"}


def test_a_deadline_earlier_than_its_creation_gets_no_time() -> None:
    new = resubmission(dead_letter(old_request(deadline_at=CREATED - 5)), NOW)
    assert new.deadline_at == NOW


def test_each_resubmission_gets_its_own_id() -> None:
    letter = dead_letter(old_request())
    assert resubmission(letter, NOW).request_id != resubmission(letter, NOW).request_id


class FakeProducer:
    """AIOKafkaProducer's send/ack as redrive uses it; ``fail`` makes the broker refuse."""

    instances: list[FakeProducer] = []
    fail = False

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.started = self.stopped = False
        FakeProducer.instances.append(self)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(self, topic: str, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if FakeProducer.fail:
            fut.set_exception(ConnectionError("broker gone"))
        else:
            self.sent.append((topic, key, value))
            fut.set_result(None)
        return fut


class Marks:
    def __init__(self) -> None:
        self.marked: list[tuple[str, str | None]] = []

    async def mark_redriven(self, request_id: str, new_request_id: str | None = None) -> bool:
        self.marked.append((request_id, new_request_id))
        return True


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    FakeProducer.instances, FakeProducer.fail = [], False
    monkeypatch.setattr(redrive, "AIOKafkaProducer", FakeProducer)
    return FakeProducer


async def test_redrive_writes_each_new_request_keyed_by_user_then_marks_it(
    producer: type[FakeProducer],
) -> None:
    settings = Settings(namespace="ns", broker_url="kafka://h1:9092")
    letters = [
        dead_letter(old_request()),
        dead_letter(old_request(request_id="req_b", user_id="bob")),
    ]
    store = Marks()
    done = await redrive_letters(settings, store, letters)  # type: ignore[arg-type]
    (prod,) = producer.instances
    assert prod.config["bootstrap_servers"] == ["h1:9092"] and prod.config["acks"] == "all"
    assert [(t, orjson.loads(k)) for t, k, _ in prod.sent] == [
        (settings.requests_topic, "alice"),
        (settings.requests_topic, "bob"),
    ]
    written = [InferenceRequest.from_bytes(v) for _, _, v in prod.sent]
    assert [r.request_id for r in written] == [d.new.request_id for d in done]
    assert store.marked == [("req_old", done[0].new.request_id), ("req_b", done[1].new.request_id)]
    assert prod.stopped


async def test_nothing_is_marked_when_the_log_refuses(producer: type[FakeProducer]) -> None:
    producer.fail = True
    store = Marks()
    with pytest.raises(ConnectionError):
        await redrive_letters(Settings(), store, [dead_letter(old_request())])  # type: ignore[arg-type]
    assert store.marked == [] and producer.instances[0].stopped


async def test_no_dead_letters_opens_no_producer(producer: type[FakeProducer]) -> None:
    assert await redrive_letters(Settings(), Marks(), []) == []  # type: ignore[arg-type]
    assert producer.instances == []


def test_describe_names_the_letter_its_error_and_its_redrives() -> None:
    at = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
    row = {
        **dead_letter(old_request()),
        "created_at": at,
        "error": {"type": "model_error", "message": "503 from model"},
        "history": [{}, {}, {}],
        "redrive_count": 2,
        "redriven_at": at,
    }
    line = describe(row)
    assert line.startswith(
        "req_old  user=alice  generate/sim-gpt  attempts=3  2025-03-14T08:00:00+00:00"
    )
    assert (
        "model_error: 503 from model" in line
        and "redriven 2x, last 2025-03-14T08:00:00+00:00" in line
    )
    assert describe({**row, "redriven_at": None}).endswith("redriven 2x before")
    assert describe({**row, "redriven_at": None, "redrive_count": 0, "error": None}).endswith("?: ")
