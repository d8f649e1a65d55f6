"""The typed HTTP contract: submission errors name their field, documents match their models, the spec is whole."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
import pytest

from inferstream.errors import InvalidRequest, QuotaExceeded
from schemas.api import parse_submission
from schemas.documents import Accepted, Links, QuotaDoc, QuotaErrorBody, RequestDoc, request_doc
from schemas.plans import Plan
from schemas.records import InferenceRequest, Priority, ResultEvent, Status, Task
from streams.gateway.openapi import ROUTES as API_ROUTES
from streams.gateway.openapi import openapi_spec
from tables.quota import quota_doc
from tables.quota_book import QuotaBook

ROUTES = {"generate": ["sim-gpt"], "embed": ["all-MiniLM-L6-v2"]}
PLAN = Plan("default", requests_per_day=2, tokens_per_day=100, requests_per_minute=10)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task": "dance", "input": "x"}, "task"),
        ({"task": "embed"}, "input"),
        ({"task": "embed", "input": ["a", 1]}, "input"),
        ({"task": "embed", "input": [" ", ""]}, "input"),
        ({"task": "embed", "input": ["x"] * 2049}, "input"),
        ({"task": "embed", "input": "x", "model": ""}, "model"),
        ({"task": "embed", "input": "x", "model": "sim-gpt"}, "model"),
        ({"task": "generate", "input": "x", "params": {"max_tokens": 1_000_001}}, "params.max_tokens"),
        ({"task": "generate", "input": "x", "params": {"temperature": True}}, "params.temperature"),
        ({"task": "generate", "input": "x", "params": "hot"}, "params"),
        ({"task": "embed", "input": "x", "priority": None}, "priority"),
        ({"task": "embed", "input": "x", "deadline_s": 7 * 86_400 + 1}, "deadline_s"),
        ({"task": "embed", "input": "x", "callback_url": "HTTP://user@example.com/"}, "callback_url"),
        ({"task": "embed", "input": "x", "surprise": 1}, "surprise"),
    ],
)
def test_each_rejection_names_its_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_submission(orjson.dumps(body), ROUTES)
    detail = err.value.body()["error"]
    assert detail["type"] == "invalid_request" and detail["field"] == field, detail
    assert detail["message"].startswith(("'", "unknown")), detail


def test_submission_keeps_unknown_params_and_defaults() -> None:
    body = b'{"task": "generate", "input": ["a", ""], "params": {"max_tokens": 5, "top_p": 0.5}, "model": null}'
    sub = parse_submission(body, ROUTES)
    assert sub.params == {"max_tokens": 5, "top_p": 0.5} and sub.max_tokens == 5
    assert sub.model == "sim-gpt" and sub.input == ["a", ""] and sub.input_is_list
    assert sub.priority is Priority.NORMAL and sub.task is Task.GENERATE and sub.metadata == {}


def test_records_in_the_log_decode_to_values_equal_to_the_enums() -> None:
    old = b'{"request_id": "req_1", "user_id": "u", "status": "running", "at": 1.0, "priority": "low"}'
    event = ResultEvent.from_bytes(old)
    assert event.status == Status.RUNNING and event.priority == Priority.LOW and not event.is_terminal
    req = InferenceRequest(
        request_id="req_1", user_id="u", task=Task.EMBED, model="m", input=["x"],
        estimated_tokens=1, created_at=0.0, quota_day="1970-01-01",
    )
    assert orjson.loads(req.to_bytes())["priority"] == "normal"
    assert InferenceRequest.from_bytes(req.to_bytes()).task == "embed"


def test_documents_match_their_models() -> None:
    row = {
        "request_id": "req_000000000001abcdefabcdef", "status": "completed", "task": "embed", "model": "m",
        "priority": "high", "created_at": 0.0, "updated_at": 1.5, "completed_at": 1.5, "estimated_tokens": 3,
        "attempts": 1, "result": '{"embeddings": [[0.1]]}', "error": None, "metadata": {"k": "v"},
        "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
    }
    assert msgspec.convert(request_doc(row), RequestDoc).result.embeddings == [[0.1]]  # type: ignore[union-attr]
    assert msgspec.convert(quota_doc("alice", PLAN, None, 0.0), QuotaDoc).requests.remaining == 2
    accepted = Accepted(
        request_id=row["request_id"], status="queued", estimated_tokens=3, created_at="x",
        links=Links(self_="/v1/requests/r", events="/v1/requests/r/events"),
    )
    assert msgspec.to_builtins(accepted)["links"] == {"self": "/v1/requests/r", "events": "/v1/requests/r/events"}
    book = QuotaBook({}, now=lambda: 0.0)
    book.admit("alice", PLAN, "req_a", 1)
    book.admit("alice", PLAN, "req_b", 1)
    with pytest.raises(QuotaExceeded) as err:
        book.admit("alice", PLAN, "req_c", 1)
    assert msgspec.convert(err.value.body(), QuotaErrorBody).error.tokens.estimated == 1  # type: ignore[union-attr]


def test_spec_is_generated_whole() -> None:
    spec = openapi_spec()
    text = orjson.dumps(spec).decode()
    for ref in {part.split('"')[0] for part in text.split('"$ref":"#/components/schemas/')[1:]}:
        assert ref in spec["components"]["schemas"], ref
    for route in API_ROUTES:
        op = spec["paths"][route.path][route.method]
        if not route.public:
            assert {"401", "503"} <= set(op["responses"]), route.path
    post = spec["paths"]["/v1/requests"]["post"]["responses"]
    assert set(post["202"]["headers"]) >= {"Location", "X-RateLimit-Reset"} and "Retry-After" in post["429"]["headers"]
    assert "Cancel" in spec["paths"]["/v1/requests/{request_id}"]["delete"]["summary"]
    after = {p["name"]: p for p in spec["paths"]["/v1/requests"]["get"]["parameters"]}["after"]
    assert after["schema"]["pattern"].startswith("^req_")
    model = spec["components"]["schemas"]["SubmissionBody"]["properties"]["model"]["anyOf"][0]
    assert model["minLength"] == 1
