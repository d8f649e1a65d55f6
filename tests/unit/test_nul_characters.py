"""U+0000 never reaches PostgreSQL: refused at submit, replaced in what the pipeline itself writes."""

from __future__ import annotations

import orjson
import pytest

from bridges.clients.store.pool import _jsonb_encode
from inferstream.errors import InvalidRequest
from schemas.api import parse_submission

ROUTES = {"generate": ["sim-gpt"], "embed": ["all-MiniLM-L6-v2"]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task": "generate", "input": "a\x00b"}, "input"),
        ({"task": "embed", "input": ["ok", "\x00"]}, "input[1]"),
        ({"task": "generate", "input": "ok", "metadata": {"k": ["x", "y\x00"]}}, "metadata.k[1]"),
        ({"task": "generate", "input": "ok", "metadata": {"k\x00": 1}}, "metadata.k\x00"),
        ({"task": "generate", "input": "ok", "params": {"stop": ["\x00"]}}, "params.stop[0]"),
    ],
)
def test_a_nul_anywhere_in_a_submission_is_a_400_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_submission(orjson.dumps(body), ROUTES)
    assert info.value.details["field"] == field


def test_the_text_backslash_u0000_is_not_a_nul() -> None:
    sub = parse_submission(orjson.dumps({"task": "generate", "input": "literal \\u0000"}), ROUTES)
    assert sub.input == ["literal \\u0000"]


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({"text": "a\x00b"}, {"text": "a\ufffdb"}),
        ({"text": "literal \\u0000"}, {"text": "literal \\u0000"}),
        ({"text": "\\\x00"}, {"text": "\\\ufffd"}),
        (["\x00\x00"], ["\ufffd\ufffd"]),
    ],
)
def test_jsonb_writes_replace_nul_and_keep_everything_else(value: object, stored: object) -> None:
    encoded = _jsonb_encode(value)
    assert encoded[:1] == b"\x01"
    assert orjson.loads(encoded[1:]) == stored
