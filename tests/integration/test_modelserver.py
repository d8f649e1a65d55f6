"""The reference model server as a real process: embeddings, generation, faults, bad input."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from inferstream.tokens import count_tokens
from tests.support.modelserver import (
    HOST,
    free_port,
    running_modelserver,
    start_modelserver,
    stop_modelserver,
    wait_healthy,
)

pytestmark = pytest.mark.integration
EMBED = "all-MiniLM-L6-v2"
NO_FAULTS = {
    "error_rate": 0,
    "error_status": 503,
    "latency_ms": 0,
    "fail_next": 0,
    "apply_to_embeddings": False,
}


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[str]:
    port = free_port()
    proc = start_modelserver(port, "--embed-batch-max", "64")
    try:
        health = await wait_healthy(f"http://{HOST}:{port}", time.monotonic() + 90, proc)
        assert health == {"status": "ok", "embeddings_loaded": True}
        yield f"http://{HOST}:{port}"
    finally:
        assert stop_modelserver(proc) == 0  # SIGTERM is a clean shutdown


@pytest.fixture
async def client(server: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=server) as session:
        await _post(session, "/admin/stats/reset", {})
        yield session
        await _post(session, "/admin/faults", NO_FAULTS)


async def _post(session: aiohttp.ClientSession, path: str, body: object) -> dict:
    async with session.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _stats(session: aiohttp.ClientSession) -> dict:
    async with session.get("/admin/stats") as resp:
        return await resp.json()


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_embeddings_batch_is_one_model_call(client: aiohttp.ClientSession) -> None:
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar.",
        "The quarterly tax report is due on Friday.",
    ]
    body = await _post(client, "/v1/embeddings", {"model": EMBED, "input": texts})
    assert body["object"] == "list" and body["model"] == EMBED
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in body["data"]]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert all(len(v) == 384 and all(isinstance(x, float) for x in v) for v in vectors)
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2
    tokens = count_tokens(texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    stats = await _stats(client)
    assert stats["embedding_calls"] == 1
    assert stats["embedding_inputs"] == 3
    assert stats["batch_sizes"] == {"3": 1}
    assert stats["generate_calls"] == 0


async def test_embeddings_single_string_and_alias(client: aiohttp.ClientSession) -> None:
    body = await _post(
        client, "/v1/embeddings", {"model": f"sentence-transformers/{EMBED}", "input": "hello"}
    )
    assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 384
    assert abs(_cosine(body["data"][0]["embedding"], body["data"][0]["embedding"]) - 1) < 1e-6


async def test_completions_shape_usage_and_determinism(client: aiohttp.ClientSession) -> None:
    request = {"model": "sim-gpt", "prompt": ["Tell me a story", "Hi"], "max_tokens": 12}
    first = await _post(client, "/v1/completions", request)
    second = await _post(client, "/v1/completions", request)
    assert first["object"] == "text_completion" and first["model"] == "sim-gpt"
    assert first["id"].startswith("cmpl-") and first["id"] != second["id"]
    assert isinstance(first["created"], int)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert all(c["finish_reason"] in ("stop", "length") for c in first["choices"])
    usage = first["usage"]
    assert usage["prompt_tokens"] == count_tokens(request["prompt"])  # type: ignore[arg-type]
    assert usage["completion_tokens"] == count_tokens(texts) <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = await _stats(client)
    assert stats["generate_calls"] == 2 and stats["generate_inputs"] == 4


async def test_chat_completions_shape_and_usage(client: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why logs?"},
    ]
    body = await _post(
        client,
        "/v1/chat/completions",
        {"model": "any-model", "messages": messages, "max_tokens": 5},
    )
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content and choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == count_tokens(["Be brief.", "Why logs?"])
    assert body["usage"]["completion_tokens"] == count_tokens([content]) <= 5


async def test_injected_failures_then_recovery(client: aiohttp.ClientSession) -> None:
    request = {"model": "sim-gpt", "prompt": "ping"}
    await _post(client, "/admin/faults", {"fail_next": 2})
    for _ in range(2):
        async with client.post("/v1/completions", json=request) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            error = (await resp.json())["error"]
            assert {"message", "type", "code"} <= set(error)
    async with client.post("/v1/completions", json=request) as resp:
        assert resp.status == 200
    # A failure rate of 1 fails every call, with the chosen status, until it is lifted.
    await _post(client, "/admin/faults", {"error_rate": 1.0, "error_status": 429})
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    async with client.post("/v1/chat/completions", json=chat) as resp:
        assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    # Embeddings are unaffected unless asked for.
    await _post(client, "/v1/embeddings", {"model": EMBED, "input": "still fine"})
    await _post(client, "/admin/faults", {"error_rate": 0.0})
    await _post(client, "/v1/completions", request)
    stats = await _stats(client)
    assert stats["generate_calls"] == 5 and stats["generate_failures"] == 3


async def test_faults_can_apply_to_embeddings(client: aiohttp.ClientSession) -> None:
    await _post(client, "/admin/faults", {"fail_next": 1, "apply_to_embeddings": True})
    try:
        async with client.post("/v1/embeddings", json={"model": EMBED, "input": "x"}) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        await _post(client, "/v1/embeddings", {"model": EMBED, "input": "x"})
    finally:
        await _post(client, "/admin/faults", {"apply_to_embeddings": False})
    assert (await _stats(client))["embedding_failures"] == 1


async def test_latency_does_not_block_the_server(client: aiohttp.ClientSession) -> None:
    await _post(client, "/admin/faults", {"latency_ms": 1000})
    started = time.monotonic()
    slow = asyncio.create_task(_post(client, "/v1/completions", {"model": "m", "prompt": "slow"}))
    # Poll for the slow call to be in flight, then check health answers meanwhile.
    while (await _stats(client))["generate_calls"] == 0:
        assert time.monotonic() - started < 5
    async with client.get("/healthz") as resp:
        assert resp.status == 200
    assert not slow.done()
    await slow
    assert time.monotonic() - started >= 1.0


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/embeddings", b"{not json"),
        ("/v1/completions", b""),
        ("/v1/chat/completions", b"[1, 2"),
        ("/admin/faults", b"nope"),
    ],
)
async def test_malformed_json_is_400(
    client: aiohttp.ClientSession, path: str, payload: bytes
) -> None:
    async with client.post(
        path, data=payload, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}),
        ("/v1/embeddings", {"model": EMBED}),
        ("/v1/embeddings", {"model": EMBED, "input": 42}),
        ("/v1/embeddings", {"model": EMBED, "input": ["x"] * 65}),
        ("/v1/completions", {"model": "m", "prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}),
        ("/admin/faults", {"error_rate": 3}),
    ],
)
async def test_bad_fields_are_400(client: aiohttp.ClientSession, path: str, body: object) -> None:
    async with client.post(path, json=body) as resp:
        assert resp.status == 400, await resp.text()
        assert {"message", "type", "code"} <= set((await resp.json())["error"])
    stats = await _stats(client)
    assert stats["embedding_calls"] == 0 and stats["generate_calls"] == 0


async def test_models_and_unknown_routes(client: aiohttp.ClientSession) -> None:
    async with client.get("/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"sim-gpt", EMBED}
    async with client.get("/v1/nothing") as resp:
        assert resp.status == 404 and "error" in await resp.json()


async def test_no_embeddings_mode_answers_503_and_generates() -> None:
    async with (
        running_modelserver("--no-embeddings", "--error-rate", "0") as url,
        aiohttp.ClientSession(base_url=url) as session,
    ):
        async with session.get("/healthz") as resp:
            assert await resp.json() == {"status": "ok", "embeddings_loaded": False}
        async with session.post("/v1/embeddings", json={"model": EMBED, "input": "x"}) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "embeddings_disabled"
        async with session.post("/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
            assert resp.status == 200


async def test_failed_start_is_reported() -> None:
    port = free_port()
    proc: subprocess.Popen[bytes] = start_modelserver(port, "--error-rate", "7")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            await wait_healthy(f"http://{HOST}:{port}", time.monotonic() + 30, proc)
    finally:
        stop_modelserver(proc)
