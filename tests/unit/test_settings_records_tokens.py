"""Settings, records, token estimation and request validation: pure logic, no services."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest

from inferstream.errors import InvalidRequest
from inferstream.ids import is_request_id, new_request_id
from inferstream.settings import Settings, markdown_table
from inferstream.tokens import count_tokens, estimate_tokens
from schemas.api import parse_submission
from schemas.documents import request_doc
from schemas.records import InferenceRequest, ResultEvent

ROOT = Path(__file__).resolve().parents[2]
ROUTES = {"generate": ["sim-gpt"], "embed": ["all-MiniLM-L6-v2"]}


def test_settings_defaults_and_env() -> None:
    s = Settings.from_env({})
    assert s.namespace == "inferstream" and s.web_port == 6066 and s.session_timeout_s == 60.0
    s = Settings.from_env({"INFERSTREAM_WEB_PORT": "7000", "INFERSTREAM_NAMESPACE": "t-1", "OTHER": "x"})
    assert s.web_port == 7000 and s.requests_topic == "t-1.inference.requests" and s.db_schema == "t_1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.web_port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="INFERSTREAM_WEB_PORT"):
        Settings.from_env({"INFERSTREAM_WEB_PORT": "eighty"})


def test_settings_roles_routes_and_secrets() -> None:
    s = Settings(roles="ml", models="embed:a, embed:b ,generate:g", key_secret="sekrit")
    assert s.has_ml and not s.has_pipeline
    assert s.model_routes == {"embed": ["a", "b"], "generate": ["g"]}
    assert s.masked()["key_secret"] == "***" and s.masked()["namespace"] == "inferstream"


def test_bootstrap_servers() -> None:
    """The one conversion of INFERSTREAM_BROKER_URL for plain aiokafka clients (replay, audit, redrive, tests)."""
    assert Settings(broker_url="kafka://h1:9092;kafka://h2:9093/").bootstrap_servers == ["h1:9092", "h2:9093"]
    assert Settings(broker_url="h1:9092, h2:9092").bootstrap_servers == ["h1:9092", "h2:9092"]


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.env_names():
        assert f"`{name}`" in readme, name
    assert markdown_table().splitlines()[2] in readme
    first_block = readme.split("```")[1]
    assert "scripts/up" in first_block and "scripts/test" in first_block


def test_records_round_trip_and_old_records_decode() -> None:
    req = InferenceRequest(
        request_id=new_request_id(), user_id="u", task="embed", model="m", input=["a"],
        estimated_tokens=3, created_at=1.0, quota_day="2026-01-01",
    )
    assert InferenceRequest.from_bytes(req.to_bytes()) == req
    assert InferenceRequest.loads(req.dumps()) == req
    # A record written before optional fields existed still decodes.
    old = {k: v for k, v in req.asdict().items() if k in {
        "request_id", "user_id", "task", "model", "input", "estimated_tokens", "created_at", "quota_day"}}
    assert InferenceRequest.from_bytes(orjson.dumps(old)).priority == "normal"
    ev = ResultEvent.for_request(req, "completed", at=2.0, usage={"total_tokens": 3})
    assert ev.is_terminal and ResultEvent.from_bytes(ev.to_bytes()) == ev
    # Defaults are not shared between instances.
    other = InferenceRequest.from_bytes(orjson.dumps(old))
    assert other.params is None and req.params is None


def test_request_ids_sort_by_time() -> None:
    a, b = new_request_id(1000.0), new_request_id(2000.0)
    assert a < b and is_request_id(a) and not is_request_id("req_xyz")


def test_token_estimation_uses_a_real_tokenizer() -> None:
    assert count_tokens(["hello world"]) == 2
    assert count_tokens(["unbelievably"]) > 1  # WordPiece splits it
    assert count_tokens([]) == 0
    assert estimate_tokens("embed", ["hello world", "hi"], None, 256) == 3
    assert estimate_tokens("generate", ["hello world"], None, 256) == 258
    assert estimate_tokens("generate", ["hello world"], 10, 256) == 12


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"task": "dance", "input": "x"}',
        b'{"task": "embed"}',
        b'{"task": "embed", "input": []}',
        b'{"task": "embed", "input": [1]}',
        b'{"task": "embed", "input": "   "}',
        b'{"task": "embed", "input": "x", "model": "gpt-9"}',
        b'{"task": "generate", "input": "x", "params": {"max_tokens": 0}}',
        b'{"task": "generate", "input": "x", "params": {"max_tokens": true}}',
        b'{"task": "generate", "input": "x", "params": {"temperature": 9}}',
        b'{"task": "embed", "input": "x", "priority": "urgent"}',
        b'{"task": "embed", "input": "x", "deadline_s": -1}',
        b'{"task": "embed", "input": "x", "metadata": []}',
        b'{"task": "embed", "input": "x", "callback_url": "ftp://x"}',
        b'{"task": "embed", "input": "x", "surprise": 1}',
    ],
)
def test_invalid_submissions_are_rejected(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_submission(body, ROUTES)
    assert err.value.body()["error"]["type"] == "invalid_request"


def test_valid_submission_defaults() -> None:
    sub = parse_submission(b'{"task": "generate", "input": "hi", "params": {"max_tokens": 5}}', ROUTES)
    assert sub.model == "sim-gpt" and sub.input == ["hi"] and not sub.input_is_list
    assert sub.priority == "normal" and sub.max_tokens == 5
    sub = parse_submission(b'{"task": "embed", "input": ["a", "b"], "priority": "low"}', ROUTES)
    assert sub.input_is_list and sub.priority == "low"


def test_request_doc_shape() -> None:
    row = {
        "request_id": "req_1", "status": "completed", "task": "embed", "model": "m", "priority": "high",
        "created_at": 0.0, "updated_at": 1.5, "completed_at": 1.5, "estimated_tokens": 3, "attempts": 1,
        "result": '{"embeddings": [[0.1]]}', "usage": {"total_tokens": 3}, "error": None, "metadata": {},
    }
    doc = request_doc(row)
    assert doc["created_at"] == "1970-01-01T00:00:00.000Z" and doc["completed_at"] == "1970-01-01T00:00:01.500Z"
    assert doc["result"] == {"embeddings": [[0.1]]} and "error" not in doc and "metadata" not in doc
