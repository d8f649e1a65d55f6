"""The simulated generator and request parsing of the model server: pure logic, no process."""

from __future__ import annotations

import pytest

from inferstream.tokens import count_tokens
from modelserver.config import Faults, Stats
from modelserver.generator import (
    DEFAULT_MAX_TOKENS,
    complete,
    complete_chat,
    generate_text,
    vocabulary,
)
from modelserver.validation import (
    ApiError,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_faults,
)

PROMPTS = ["hello world", "Summarise the quarterly report.", "", "ünïcödé and emoji 🚀", "x" * 500]


def test_vocabulary_words_are_single_tokens() -> None:
    words = vocabulary()
    assert len(words) > 30
    assert all(count_tokens([w]) == 1 for w in words)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_prompt_same_text(prompt: str) -> None:
    assert complete(prompt, 40) == complete(prompt, 40)


def test_different_prompts_differ() -> None:
    texts = {generate_text(p, 32)[0] for p in PROMPTS}
    assert len(texts) == len(PROMPTS)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, DEFAULT_MAX_TOKENS, 64, 500])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_respects_max_tokens_and_counts_usage(prompt: str, max_tokens: int) -> None:
    c = complete(prompt, max_tokens)
    assert 1 <= c.completion_tokens <= max_tokens
    assert c.completion_tokens == count_tokens([c.text])
    assert c.prompt_tokens == count_tokens([prompt])
    assert c.total_tokens == c.prompt_tokens + c.completion_tokens
    # A shorter budget cuts the same text: a prefix, finished by length.
    if c.finish_reason == "length":
        assert c.completion_tokens == max_tokens
    full, _ = generate_text(prompt, 1000)
    assert full.startswith(c.text)


def test_finish_reason_stop_when_budget_is_large() -> None:
    c = complete("hello world", 1000)
    assert c.finish_reason == "stop"
    assert 8 <= c.completion_tokens <= 64


def test_default_max_tokens() -> None:
    assert complete("a prompt long enough").completion_tokens <= DEFAULT_MAX_TOKENS


def test_chat_usage_counts_contents() -> None:
    messages = [("system", "You are terse."), ("user", "What is a log?")]
    c = complete_chat(messages, 10)
    assert c == complete_chat(messages, 10)
    assert c.prompt_tokens == count_tokens(["You are terse.", "What is a log?"])
    assert c.completion_tokens == count_tokens([c.text]) <= 10


def test_parse_completion_defaults_and_lists() -> None:
    req = parse_completion({"model": "m", "prompt": ["a", "b"]})
    assert req.prompts == ["a", "b"]
    assert req.max_tokens == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"prompt": "x"},
        {"model": "m"},
        {"model": 3, "prompt": "x"},
        {"model": "m", "prompt": []},
        {"model": "m", "prompt": [1, 2]},
        {"model": "m", "prompt": "x", "max_tokens": 0},
        {"model": "m", "prompt": "x", "max_tokens": "5"},
        {"model": "m", "prompt": "x", "max_tokens": True},
        {"model": "m", "prompt": "x", "temperature": "hot"},
        {"model": "m", "prompt": "x", "stream": "yes"},
        {"model": "m", "prompt": "x", "stream": False, "stream_options": {"include_usage": True}},
    ],
)
def test_parse_completion_rejects(body: object) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion(body)
    assert info.value.status == 400
    assert set(info.value.body()["error"]) >= {"message", "type", "code"}


def test_parse_chat() -> None:
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 3,
        }
    )
    assert req.messages == [("user", "hi"), ("assistant", "")]
    for bad in ({"model": "m", "messages": []}, {"model": "m", "messages": [{"role": "x"}]}):
        with pytest.raises(ApiError):
            parse_chat(bad)


def test_parse_embedding() -> None:
    req = parse_embedding({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "hi"}, 4)
    assert req.texts == ["hi"]
    for bad in (
        {"model": "text-embedding-3-small", "input": "hi"},
        {"model": "all-MiniLM-L6-v2"},
        {"model": "all-MiniLM-L6-v2", "input": ["a"] * 5},
        {"model": "all-MiniLM-L6-v2", "input": [[1, 2]]},
        {"model": "all-MiniLM-L6-v2", "input": "a", "dimensions": 128},
    ):
        with pytest.raises(ApiError):
            parse_embedding(bad, 4)


def test_faults_fail_next_then_rate() -> None:
    faults = Faults()
    faults.update(parse_faults({"fail_next": 2}))
    assert [faults.should_fail() for _ in range(4)] == [True, True, False, False]
    faults.update(parse_faults({"error_rate": 1}))
    assert faults.should_fail()
    for bad in ({"error_rate": 2}, {"error_status": 200}, {"bogus": 1}, {"apply_to_embeddings": 1}):
        with pytest.raises(ApiError):
            parse_faults(bad)


def test_stats_reset() -> None:
    stats = Stats()
    stats.embedding_calls = 3
    stats.batch_sizes[3] += 1
    assert stats.as_dict()["batch_sizes"] == {"3": 1}
    stats.reset()
    assert stats.as_dict()["embedding_calls"] == 0 and stats.as_dict()["batch_sizes"] == {}
