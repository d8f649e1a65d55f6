"""Chat generations (the Batch API's chat lines): the model server's ``/v1/chat/completions``, streamed and
not, the client that calls it when ``params`` carry ``messages``, and the endpoint path the ML worker uses.

The model server runs in-process (aiohttp's TestServer): no external service.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bridges.clients.model import ModelClient, generation_call, is_chat
from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.routes import parse_routes
from inferstream.settings import Settings
from modelserver.app import SERVER_KEY
from modelserver.generator import complete, complete_chat
from schemas.records import InferenceRequest
from tests.support.modelserver import base_url, in_process_generator
from workers.endpoint import Endpoint
from workers.job import _operation
from workers.worker import _cancel_ids

MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is a stream?"},
]
PAIRS = [(m["role"], m["content"]) for m in MESSAGES]


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with in_process_generator() as srv:
        yield srv


@pytest.fixture
async def client(server: TestServer) -> AsyncIterator[ModelClient]:
    c = ModelClient(Settings(), base_url=base_url(server))
    try:
        yield c
    finally:
        await c.close()


def test_messages_pick_the_chat_call_and_the_other_params_pass_through() -> None:
    path, payload = generation_call(
        "sim-gpt", "system: ...", {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    )
    assert path == "/chat/completions"
    assert payload == {
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0,
        "model": "sim-gpt",
    }  # no prompt
    path, payload = generation_call("sim-gpt", "hello", {"max_tokens": 5})
    assert path == "/completions" and payload == {
        "max_tokens": 5,
        "model": "sim-gpt",
        "prompt": "hello",
    }
    assert is_chat({"messages": []}) and not is_chat(None) and not is_chat({"max_tokens": 3})
    assert _operation(False, {"messages": MESSAGES}) == "chat"
    assert _operation(False, None) == "text_completion" and _operation(True, None) == "embeddings"


async def test_a_chat_generation_returns_the_reply_and_its_usage(
    server: TestServer, client: ModelClient
) -> None:
    text, usage = await client.generate(
        "sim-gpt", "ignored", {"messages": MESSAGES, "max_tokens": 12}
    )
    expected = complete_chat(PAIRS, 12)
    assert text == expected.text
    assert usage == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.total_tokens,
    }
    stats = server.app[SERVER_KEY].stats
    assert stats.generate_calls == 1 and stats.generate_inputs == 1


async def test_chat_failures_map_like_completions(server: TestServer, client: ModelClient) -> None:
    faults = server.app[SERVER_KEY].faults
    faults.update({"fail_next": 1, "error_status": 429})
    with pytest.raises(RetryableModelError) as retryable:
        await client.generate("sim-gpt", "", {"messages": MESSAGES})
    assert retryable.value.status == 429 and retryable.value.retry_after == 1.0
    with pytest.raises(FatalModelError) as fatal:
        await client.generate("sim-gpt", "", {"messages": [{"role": "nobody", "content": "x"}]})
    assert fatal.value.status == 400
    with pytest.raises(FatalModelError):
        await client.generate("sim-gpt", "", {"messages": []})
    assert server.app[SERVER_KEY].stats.generate_failures == 1


async def test_the_latency_knob_applies_to_chat(server: TestServer, client: ModelClient) -> None:
    server.app[SERVER_KEY].faults.update({"latency_ms": 300})
    started = time.monotonic()
    await client.generate("sim-gpt", "", {"messages": MESSAGES, "max_tokens": 2})
    assert time.monotonic() - started >= 0.3


async def _chat_frames(srv: TestServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url(srv)}/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    frames = [f for f in raw.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    return [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-1]]


async def test_the_server_streams_chat_chunks_that_add_up_to_the_reply(server: TestServer) -> None:
    body = {"model": "sim-gpt", "messages": MESSAGES, "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    *chunks, usage_chunk = await _chat_frames(server, body)
    expected = complete_chat(PAIRS, 10)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "sim-gpt" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected.text
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        expected.finish_reason
    ]
    assert (
        usage_chunk["choices"] == []
        and usage_chunk["usage"]["total_tokens"] == expected.total_tokens
    )
    assert (
        usage_chunk["id"].startswith("chatcmpl-")
        and len({c["id"] for c in [*chunks, usage_chunk]}) == 1
    )
    stats = server.app[SERVER_KEY].stats
    assert stats.streams_started == stats.streams_completed == 1


async def test_the_client_streams_a_chat(client: ModelClient) -> None:
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    text, usage = await client.generate_stream(
        "sim-gpt", "", {"messages": MESSAGES, "max_tokens": 9}, on_delta
    )
    expected = complete_chat(PAIRS, 9)
    assert text == expected.text == "".join(deltas)
    assert len(deltas) == expected.completion_tokens
    assert usage["total_tokens"] == expected.total_tokens


def _endpoint(base: str, settings: Settings) -> Endpoint:
    text = f"routes:\n  - task: generate\n    model: sim-gpt\n    backends:\n      - {{name: local, url: '{base}', model: sim-gpt}}\n"
    table = parse_routes(text, source="routes.yaml", fmt="yaml", settings=settings, environ={})
    (route,) = table.routes
    return Endpoint(settings, route)


async def test_the_endpoint_sends_messages_to_chat_with_the_default_max_tokens(
    server: TestServer,
) -> None:
    settings = Settings(namespace="tchat", default_max_tokens=6)
    endpoint = _endpoint(base_url(server), settings)
    rendered = ["system: You answer briefly.", "user: What is a stream?"]
    try:
        result, usage, backend = await endpoint.infer(rendered, {"messages": MESSAGES})
        assert backend == "local"
        assert result == {"text": complete_chat(PAIRS, 6).text}
        assert usage["completion_tokens"] <= 6
        streamed: list[str] = []

        async def on_delta(text: str) -> None:
            streamed.append(text)

        params = {"messages": MESSAGES, "stream": True}
        result, _, _ = await endpoint.infer(rendered, params, None, None, on_delta)
        assert result == {"text": "".join(streamed)} == {"text": complete_chat(PAIRS, 6).text}
        # Without messages the same input is a completion of its lines.
        result, _, _ = await endpoint.infer(rendered, {"max_tokens": 4})
        assert result == {"text": complete("\n".join(rendered), 4).text}
    finally:
        await endpoint.close()


def test_a_batch_line_is_stopped_by_its_own_or_its_batch_cancel_mark() -> None:
    base = dict(user_id="u", task="generate", model="sim-gpt", input=["x"], estimated_tokens=1,
                created_at=0.0, quota_day="2030-01-01")  # fmt: skip
    alone = InferenceRequest(request_id="req_a", **base)  # type: ignore[arg-type]
    line = InferenceRequest(request_id="req_b", batch_id="batch_0123", batch_line=3, **base)  # type: ignore[arg-type]
    assert _cancel_ids(alone) == ["req_a"]
    assert _cancel_ids(line) == ["req_b", "batch_0123"]
