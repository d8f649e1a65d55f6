"""The lines of a batch input file: structural checks at upload, the per-endpoint parse, the streamed splitter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inferstream.errors import InvalidRequest
from inferstream.tokens import estimate_tokens
from schemas.batch_lines import (
    MAX_LISTED,
    BatchLine,
    LineProblems,
    LineSplitter,
    check_upload_line,
    custom_ids,
    parse_batch_lines,
    parse_line,
    render_messages,
    split_lines,
)

ROUTES = {"embed": ["all-MiniLM-L6-v2", "e5-small"], "generate": ["sim-gpt"]}
EMB, CMPL, CHAT = "/v1/embeddings", "/v1/completions", "/v1/chat/completions"


def line(body: dict[str, Any], url: str = EMB, custom_id: str = "a", **extra: Any) -> bytes:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}
    ).encode()


def parse(body: dict[str, Any], url: str = EMB) -> BatchLine:
    (parsed,) = parse_batch_lines(line(body, url), url, ROUTES, 256)
    return parsed


def problem(body: dict[str, Any], url: str = EMB) -> str:
    with pytest.raises(LineProblems) as caught:
        parse_batch_lines(line(body, url), url, ROUTES, 256)
    (err,) = caught.value.errors
    assert err["line"] == 1
    return str(err["message"])


# ---- upload checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty line"),
        (b"  \r", "empty line"),
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b'{"method": "POST", "url": "/v1/embeddings", "body": {}}', "missing 'custom_id'"),
        (
            b'{"custom_id": "", "method": "POST", "url": "/v1/embeddings", "body": {}}',
            "'custom_id' must be a non-empty string",
        ),
        (
            b'{"custom_id": 7, "method": "POST", "url": "/v1/embeddings", "body": {}}',
            "'custom_id' must be a non-empty string",
        ),
        (
            b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}',
            "'method' must be \"POST\"",
        ),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/files", "body": {}}',
            "'url' must be one of",
        ),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": []}',
            "'body' must be an object",
        ),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}', "missing 'body'"),
    ],
)
def test_check_upload_line_names_the_problem(raw: bytes, expected: str) -> None:
    found = check_upload_line(raw, 1, set())
    assert found is not None and expected in found, found


def test_check_upload_line_accepts_a_good_line_and_remembers_its_custom_id() -> None:
    seen: set[str] = set()
    assert check_upload_line(line({"input": "x"}) + b"\r", 1, seen) is None
    assert seen == {"a"}
    again = check_upload_line(line({"input": "y"}, url=CHAT), 2, seen)
    assert again is not None and "not unique" in again


def test_check_upload_line_does_not_check_bodies() -> None:
    """The body is checked against the batch's endpoint at creation, not at upload."""
    assert check_upload_line(line({"anything": 1}), 1, set()) is None


# ---- splitting ----------------------------------------------------------------------------------


def test_split_lines_counts_physical_lines_and_a_final_newline_ends_the_last() -> None:
    assert list(split_lines(b"")) == []
    assert list(split_lines(b"a\nb\n")) == [b"a", b"b"]
    assert list(split_lines(b"a\nb")) == [b"a", b"b"]
    assert list(split_lines(b"a\n\nb\n")) == [b"a", b"", b"b"]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_the_splitter_gives_the_same_lines_whatever_the_chunks(size: int) -> None:
    content = b"first line\nsecond\n\nfourth is longer than the others\nlast without newline"
    splitter = LineSplitter()
    lines = []
    for at in range(0, len(content), size):
        lines += splitter.feed(content[at : at + size])
    lines += splitter.end()
    assert lines == list(split_lines(content))


def test_the_splitter_handles_a_final_newline_and_a_long_line() -> None:
    splitter = LineSplitter()
    long = b"x" * 100_000
    out = [*splitter.feed(long[:50_000]), *splitter.feed(long[50_000:] + b"\n")]
    assert out == [long] and splitter.end() == []


def test_custom_ids_by_line() -> None:
    content = (
        line({"input": "x"}, custom_id="one")
        + b"\n"
        + line({"input": "y"}, custom_id="two")
        + b"\n"
    )
    assert custom_ids(content) == ["one", "two"]


# ---- embeddings ---------------------------------------------------------------------------------


def test_embeddings_string_and_list() -> None:
    one = parse({"input": "hello world"})
    assert (one.task, one.model, one.input, one.input_is_list, one.params) == (
        "embed", "all-MiniLM-L6-v2", ["hello world"], False, None
    )  # fmt: skip
    assert one.estimated_tokens == estimate_tokens("embed", ["hello world"], None, 256)
    many = parse(
        {"input": ["a b", "c"], "model": "e5-small", "encoding_format": "float", "user": "u1"}
    )
    assert (many.model, many.input, many.input_is_list) == ("e5-small", ["a b", "c"], True)
    assert many.estimated_tokens == estimate_tokens("embed", ["a b", "c"], None, 256)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "missing 'body.input'"),
        ({"input": ""}, "'body.input'"),
        ({"input": ["ok", " "]}, "'body.input'"),
        ({"input": []}, "'body.input'"),
        ({"input": [1, 2]}, "'body.input'"),
        ({"input": "a\u0000b"}, "NUL"),
        ({"input": ["ok", "a\u0000"]}, "NUL"),
        ({"input": "x", "encoding_format": "base64"}, '"base64" is not supported'),
        ({"input": "x", "encoding_format": "int8"}, 'must be "float"'),
        ({"input": "x", "dimensions": 128}, "'body.dimensions' is not supported"),
        ({"input": "x", "model": "nope"}, "unknown model 'nope'"),
        ({"input": "x", "model": "sim-gpt"}, "unknown model 'sim-gpt'"),
        ({"input": "x", "temperature": 1}, "unknown field 'body.temperature'"),
    ],
)
def test_embeddings_problems(body: dict[str, Any], expected: str) -> None:
    assert expected in problem(body)


# ---- completions --------------------------------------------------------------------------------


def test_completions_params_and_estimate() -> None:
    got = parse(
        {"model": "sim-gpt", "prompt": "Say hi", "max_tokens": 16, "temperature": 0.2, "top_p": 0.9,
         "stop": ["\n"], "seed": 7, "n": 1},
        CMPL,
    )  # fmt: skip
    assert (got.task, got.input, got.input_is_list) == ("generate", ["Say hi"], False)
    assert got.params == {
        "max_tokens": 16,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n"],
        "seed": 7,
    }
    assert got.estimated_tokens == estimate_tokens("generate", ["Say hi"], 16, 256)
    default = parse({"prompt": "Say hi"}, CMPL)
    assert default.model == "sim-gpt" and default.params == {}
    assert default.estimated_tokens == estimate_tokens("generate", ["Say hi"], None, 256)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "missing 'body.prompt'"),
        ({"prompt": ["a", "b"]}, "'body.prompt' must be a non-blank string"),
        ({"prompt": "x", "n": 2}, "'body.n' must be 1"),
        ({"prompt": "x", "max_tokens": 0}, "'body.max_tokens' must be an integer from 1"),
        ({"prompt": "x", "temperature": 2.5}, "'body.temperature' must be a number from 0 to 2"),
        ({"prompt": "x", "top_p": 1.5}, "'body.top_p'"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "'body.stop'"),
        ({"prompt": "x", "seed": "s"}, "'body.seed' must be an integer"),
        ({"prompt": "x", "logprobs": 2}, "unknown field 'body.logprobs'"),
    ],
)
def test_completions_problems(body: dict[str, Any], expected: str) -> None:
    assert expected in problem(body, CMPL)


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_renders_the_messages_and_carries_them_in_params() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    got = parse({"messages": messages, "max_completion_tokens": 32, "temperature": 0}, CHAT)
    assert got.task == "generate" and got.model == "sim-gpt"
    assert got.input == ["system: Be brief.\nuser: Hello?"] == [render_messages(messages)]
    assert got.params == {"messages": messages, "max_tokens": 32, "temperature": 0.0}
    assert got.estimated_tokens == estimate_tokens("generate", got.input, 32, 256)
    legacy = parse({"messages": messages, "max_tokens": 8}, CHAT)
    assert legacy.params is not None and legacy.params["max_tokens"] == 8


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "missing 'body.messages'"),
        ({"messages": []}, "'body.messages'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "'body.messages[0].role' must be"),
        ({"messages": [{"role": "user"}]}, "missing 'body.messages[0].content'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "'body.messages[0].content' must be a string",
        ),
        ({"messages": [{"role": "user", "content": "  "}]}, "all empty"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 3}, "'body.n' must be 1"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 4,
                "max_completion_tokens": 5,
            },
            "differ",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": []},
            "unknown field 'body.tools'",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "model": "e5-small"}, "unknown model"),
    ],
)
def test_chat_problems(body: dict[str, Any], expected: str) -> None:
    assert expected in problem(body, CHAT)


# ---- the whole file -----------------------------------------------------------------------------


def test_lines_keep_their_index_and_problems_their_1_based_number() -> None:
    content = b"\n".join(
        [
            line({"input": "zero"}, custom_id="c0"),
            line({"input": "one"}, custom_id="c1"),
        ]
    )
    parsed = parse_batch_lines(content + b"\n", EMB, ROUTES, 256)
    assert [(p.line, p.custom_id) for p in parsed] == [(0, "c0"), (1, "c1")]
    bad = b"\n".join(
        [
            line({"input": "zero"}, custom_id="c0"),
            line({"input": "x"}, url=CHAT, custom_id="c1"),
            b"",
            line({"bad": 1}, custom_id="c0"),
            line({"bad": 1}, custom_id="c4"),
        ]
    )
    with pytest.raises(LineProblems) as caught:
        parse_batch_lines(bad, EMB, ROUTES, 256)
    errors = caught.value.errors
    assert [e["line"] for e in errors] == [2, 3, 4, 5]
    assert "batch's endpoint" in errors[0]["message"] and "not unique" in errors[2]["message"]
    body = caught.value.body()["error"]
    assert body["type"] == "invalid_request" and body["errors"] == errors
    assert body["message"].startswith("4 invalid lines in the file; line 2:")


def test_at_most_100_problems_are_listed_and_all_are_counted() -> None:
    content = b"\n".join(b"{" for _ in range(250))
    with pytest.raises(LineProblems) as caught:
        parse_batch_lines(content, EMB, ROUTES, 256)
    assert len(caught.value.errors) == MAX_LISTED and caught.value.count == 250
    assert caught.value.message.startswith("250 invalid lines")


def test_an_empty_file_an_unknown_endpoint_and_a_task_without_models_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="no lines"):
        parse_batch_lines(b"", EMB, ROUTES, 256)
    with pytest.raises(InvalidRequest, match="'endpoint'"):
        parse_batch_lines(line({"input": "x"}), "/v1/moderations", ROUTES, 256)
    with pytest.raises(LineProblems, match="no model serves"):
        parse_batch_lines(line({"input": "x"}), EMB, {"generate": ["sim-gpt"]}, 256)


def test_the_parse_is_deterministic() -> None:
    content = b"\n".join(line({"prompt": f"p{i}"}, url=CMPL, custom_id=f"c{i}") for i in range(50))
    assert parse_batch_lines(content, CMPL, ROUTES, 64) == parse_batch_lines(
        content, CMPL, ROUTES, 64
    )


@pytest.mark.parametrize(
    ("url", "bodies"),
    [
        (
            EMB,
            [
                {"input": "short"},
                {"input": ["Several texts,", "each counted", "ünïcödé too"]},
                {"input": "x " * 300},
            ],
        ),
        (
            CMPL,
            [{"prompt": "A prompt"}, {"prompt": "Another, longer prompt here.", "max_tokens": 3}],
        ),
        (
            CHAT,
            [
                {"messages": [{"role": "user", "content": "hi"}]},
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "u"},
                    ],
                    "max_completion_tokens": 9,
                },
            ],
        ),
    ],
)
def test_each_line_is_estimated_as_estimate_tokens_and_parses_as_alone(
    url: str, bodies: list[dict[str, Any]]
) -> None:
    """Each line of a file gets what estimate_tokens says, and what the line parsed alone gets."""
    raws = [line(b, url, custom_id=f"c{i}") for i, b in enumerate(bodies)]
    parsed = parse_batch_lines(b"\n".join(raws), url, ROUTES, 100)
    assert [p.estimated_tokens for p in parsed] == [
        estimate_tokens(p.task, p.input, (p.params or {}).get("max_tokens"), 100) for p in parsed
    ]
    single = [parse_line(raw, i, url, ROUTES, 100) for i, raw in enumerate(raws)]
    assert single == parsed
