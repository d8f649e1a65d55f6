"""Dead-letter decoding: the request, why it died (the worker's error or RabbitMQ's x-death), its attempts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from bridges.clients.rabbitmq import RabbitClient
from bridges.dead_letters import decode_dead_letter
from schemas.records import InferenceRequest

REQUEST = InferenceRequest(
    request_id="req_1", user_id="alice", task="embed", model="all-MiniLM-L6-v2", input=["hi"],
    estimated_tokens=3, created_at=1_800_000_000.0, quota_day="2027-01-15",
)  # fmt: skip
ERROR = {"type": "model_error", "message": "503 from the model"}
HISTORY = [{"attempt": 1, "status": 503}, {"attempt": 2, "status": 503}]


@dataclass
class Message:
    """What aio-pika hands the recorder: a body and headers (AMQP strings may arrive as bytes)."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)


def worker_dead_letter(**headers: Any) -> Message:
    return Message(
        REQUEST.to_bytes(),
        {
            "error": orjson.dumps(ERROR),
            "history": orjson.dumps(HISTORY).decode(),
            "attempts": 2,
            **headers,
        },
    )


def test_a_workers_dead_letter_carries_its_error_and_history() -> None:
    message = worker_dead_letter()
    request, error, history = decode_dead_letter(message)  # type: ignore[arg-type]
    assert request == REQUEST and error == ERROR and history == HISTORY
    info = RabbitClient.dead_letter_info(message)  # type: ignore[arg-type]
    assert info["attempts"] == 2 and info["request"] == REQUEST.asdict()


def test_history_entries_that_are_not_attempts_are_dropped() -> None:
    message = worker_dead_letter(history=orjson.dumps([HISTORY[0], "noise", 3, HISTORY[1]]))
    assert decode_dead_letter(message)[2] == HISTORY  # type: ignore[arg-type]


def test_a_message_rabbitmq_dead_lettered_says_why_from_x_death() -> None:
    deaths = [
        {"reason": b"rejected", "queue": b"ns.work.embed.normal", "count": 1},
        {"reason": "expired"},
    ]
    message = Message(REQUEST.to_bytes(), {"x-death": deaths})
    request, error, history = decode_dead_letter(message)  # type: ignore[arg-type]
    assert request == REQUEST and history == []
    assert error == {"type": "rejected", "message": "rejected from ns.work.embed.normal"}
    assert RabbitClient.dead_letter_info(message)["attempts"] is None  # type: ignore[arg-type]


@pytest.mark.parametrize("deaths", [None, [], "garbled", ["not a dict"]])
def test_without_a_readable_x_death_the_reason_is_unknown(deaths: Any) -> None:
    headers = {} if deaths is None else {"x-death": deaths}
    _, error, _ = decode_dead_letter(Message(REQUEST.to_bytes(), headers))  # type: ignore[arg-type]
    assert error == {"type": "rejected", "message": "unknown from ?"}


def test_an_error_header_that_is_not_an_object_falls_back_to_x_death() -> None:
    message = worker_dead_letter(
        error=b'"boom"', **{"x-death": [{"reason": "maxlen", "queue": "q"}]}
    )
    assert decode_dead_letter(message)[1] == {"type": "rejected", "message": "maxlen from q"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", orjson.dumps({"request_id": "req_1"}), orjson.dumps("text")],
    ids=["not-json", "a-list", "missing-fields", "a-string"],
)
def test_a_body_that_is_not_a_request_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError, match="not a dead-lettered request"):
        decode_dead_letter(Message(body))  # type: ignore[arg-type]


def test_a_garbled_error_header_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a dead-lettered request"):
        decode_dead_letter(worker_dead_letter(error=b"{not json"))  # type: ignore[arg-type]
