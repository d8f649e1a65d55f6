"""Streamed output: the model server's SSE chunks, the client that reads them, the worker's offsets, the SSE ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bridges.clients.model import ModelClient
from bridges.clients.redis import CacheUnavailable
from inferstream.errors import FatalModelError, RetryableModelError
from inferstream.settings import Settings
from modelserver.app import SERVER_KEY
from modelserver.generator import complete
from modelserver.streaming import pieces
from streams.gateway.sse import (
    _Emitter,
    format_output,
    parse_cursor,
    streams_output,
)
from tests.support.modelserver import base_url, in_process_generator
from tests.support.wait import wait_for
from workers.streaming import OutputStream, wants_stream

PROMPT = "tell me about streams"


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with in_process_generator() as srv:
        yield srv


async def _raw_stream(srv: TestServer, body: dict[str, Any]) -> list[bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url(srv)}/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    return [frame for frame in raw.split(b"\n\n") if frame]


async def test_the_server_streams_openai_chunks_that_add_up_to_the_completion(
    server: TestServer,
) -> None:
    body = {"model": "sim-gpt", "prompt": PROMPT, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    frames = await _raw_stream(server, body)
    assert frames[-1] == b"data: [DONE]"
    chunks = [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-1]]
    expected = complete(PROMPT, 12)
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == expected.text
    assert all(c["object"] == "text_completion" and c["model"] == "sim-gpt" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == expected.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": expected.completion_tokens,
        "total_tokens": expected.total_tokens,
    }
    assert len({c["id"] for c in chunks}) == 1


async def test_without_include_usage_there_is_no_usage_chunk(server: TestServer) -> None:
    frames = await _raw_stream(server, {"model": "sim-gpt", "prompt": PROMPT, "stream": True})
    chunks = [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-1]]
    assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks)


def test_pieces_concatenate_to_the_text() -> None:
    assert pieces("a b  c") == ["a", " b", " ", " c"]
    assert "".join(pieces("a b  c")) == "a b  c"
    assert pieces("") == []


async def test_the_client_hands_over_each_delta_and_returns_text_and_usage(
    server: TestServer,
) -> None:
    client = ModelClient(Settings(), base_url=base_url(server))
    deltas: list[str] = []

    async def on_delta(text: str) -> None:
        deltas.append(text)

    try:
        text, usage = await client.generate_stream("sim-gpt", PROMPT, {"max_tokens": 9}, on_delta)
    finally:
        await client.close()
    expected = complete(PROMPT, 9)
    assert text == expected.text == "".join(deltas)
    assert len(deltas) == expected.completion_tokens
    assert usage["total_tokens"] == expected.total_tokens
    assert usage["completion_tokens"] == expected.completion_tokens


async def test_the_client_maps_stream_errors(server: TestServer) -> None:
    client = ModelClient(Settings(), base_url=base_url(server))

    async def ignore(text: str) -> None:
        pass

    server.app[SERVER_KEY].faults.update({"fail_next": 1, "error_status": 503})
    try:
        with pytest.raises(RetryableModelError):
            await client.generate_stream("sim-gpt", PROMPT, None, ignore)
        with pytest.raises(FatalModelError):
            await client.generate_stream("sim-gpt", PROMPT, {"max_tokens": 0}, ignore)
    finally:
        await client.close()


async def test_a_client_that_goes_away_stops_the_generation(server: TestServer) -> None:
    model = server.app[SERVER_KEY]
    model.faults.update({"token_latency_ms": 50})
    client = ModelClient(Settings(), base_url=base_url(server))
    first = asyncio.Event()

    async def on_delta(text: str) -> None:
        first.set()

    call = asyncio.create_task(
        client.generate_stream("sim-gpt", PROMPT, {"max_tokens": 64}, on_delta)
    )
    try:
        await asyncio.wait_for(first.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for(
            lambda: model.stats.streams_aborted == 1, timeout=5, what="the stream to stop"
        )
    finally:
        await client.close()
    assert model.stats.streams_completed == 0
    assert model.stats.stream_chunks < complete(PROMPT, 64).completion_tokens


class FakeSink:
    def __init__(self, so_far: str = "", fail: bool = False) -> None:
        self.text = so_far
        self.sent: list[tuple[str, int]] = []
        self.fail = fail

    async def publish_output(self, request_id: str, delta: str, offset: int) -> None:
        if self.fail:
            raise CacheUnavailable("down")
        assert offset == len(self.text)
        self.text += delta
        self.sent.append((delta, offset))

    async def output_so_far(self, request_id: str) -> str:
        return self.text


async def test_offsets_count_characters_and_a_retry_sends_only_what_is_new() -> None:
    sink = FakeSink()
    out = OutputStream("req_1", sink)
    await out.resume()
    out.new_attempt()
    for piece in ("héllo", " wo"):
        await out.on_delta(piece)
        await out.drain()
    out.new_attempt()  # the call broke off; the retry generates from the start
    for piece in ("hé", "llo wo", "rld"):
        await out.on_delta(piece)
        await out.drain()
    assert sink.sent == [("héllo", 0), (" wo", 5), ("rld", 8)]
    assert sink.text == "héllo world"


async def test_a_redelivered_request_continues_after_what_was_published() -> None:
    sink = FakeSink(so_far="one two")
    out = OutputStream("req_1", sink)
    await out.resume()
    out.new_attempt()
    for piece in ("one", " two", " three"):
        await out.on_delta(piece)
    await out.drain()
    assert sink.sent == [(" three", 7)]


async def test_pieces_that_arrive_during_a_publish_go_out_together() -> None:
    sink = FakeSink()
    out = OutputStream("req_1", sink)
    await out.resume()
    out.new_attempt()
    for piece in ("a", " b", " c", " d"):
        await out.on_delta(piece)  # no await in between: the first publish has not run yet
    await out.drain()
    assert sink.sent == [("a b c d", 0)]
    await out.on_delta(" e")
    await out.drain()
    assert sink.sent[-1] == (" e", 7) and sink.text == "a b c d e"


async def test_a_redis_failure_stops_the_deltas_not_the_call() -> None:
    sink = FakeSink(fail=True)
    out = OutputStream("req_1", sink)
    await out.resume()
    out.new_attempt()
    await out.on_delta("a")
    await out.drain()
    sink.fail = False
    await out.on_delta(" b")
    await out.drain()
    assert sink.sent == []


def test_only_generations_that_ask_stream() -> None:
    assert wants_stream("generate", {"stream": True})
    assert not wants_stream("generate", {"stream": False})
    assert not wants_stream("generate", None)
    assert not wants_stream("embed", {"stream": True})
    running = {"task": "generate", "status": "running", "params": {"stream": True}}
    assert streams_output(running)
    assert not streams_output({**running, "status": "completed"})
    assert not streams_output({**running, "params": {"stream": False}})
    assert streams_output({**running, "params": None})  # a status document: it may stream
    assert not streams_output({**running, "task": "embed"})


@pytest.mark.parametrize(
    ("header", "cursor"),
    [(None, (0, 0)), ("2", (2, 0)), ("3", (3, 0)), ("3.17", (3, 17)), ("3.0", (3, 0)),
     ("2.5", None), ("4.1", None), ("3.-1", None), ("3.x", None), ("x", None), ("9", None)],
)  # fmt: skip
def test_last_event_id_of_an_output_event(
    header: str | None, cursor: tuple[int, int] | None
) -> None:
    assert parse_cursor(header) == cursor


class Wire:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def events(self) -> list[tuple[str, str, dict[str, Any]]]:
        out = []
        for chunk in self.chunks:
            fields = dict(line.split(": ", 1) for line in chunk.decode().strip().split("\n"))
            out.append((fields["id"], fields["event"], orjson.loads(fields["data"])))
        return out


def test_an_output_event_names_the_text_the_client_then_has() -> None:
    assert format_output("ab", 3) == b'id: 3.5\nevent: output\ndata: {"delta":"ab","offset":3}\n\n'


async def test_output_is_trimmed_deduplicated_and_gaps_are_reported() -> None:
    wire = Wire()
    em = _Emitter(wire, 2, 0)  # type: ignore[arg-type]
    assert await em.send_output("one", 0)
    assert await em.send_output("one", 0)  # a repeat: dropped
    assert await em.send_output("ne two", 1)  # overlaps: only the new part
    assert not await em.send_output(" four", 12)  # beyond what was sent: a gap
    assert not await em.send({"request_id": "r", "status": "running"})  # output implies running
    assert await em.send({"request_id": "r", "status": "completed"})
    assert await em.send_output(" late", 7)  # after the terminal event: nothing
    assert [(i, e, d) for i, e, d in wire.events()] == [
        ("3.3", "output", {"delta": "one", "offset": 0}),
        ("3.7", "output", {"delta": " two", "offset": 3}),
        ("4", "completed", {"request_id": "r", "status": "completed"}),
    ]


async def test_a_resume_gets_what_it_lacks_in_one_event() -> None:
    wire = Wire()
    em = _Emitter(wire, 3, 4)  # type: ignore[arg-type]

    async def so_far() -> str:
        return "one two three"

    await em.sync_output(so_far, "r")
    await em.sync_output(so_far, "r")  # nothing new: nothing sent
    assert await em.send_output(" three", 7)  # a live delta the text so far already had
    assert await em.send_output(" four", 13)
    assert [(i, d) for i, _, d in wire.events()] == [
        ("3.13", {"delta": "two three", "offset": 4}),
        ("3.18", {"delta": " four", "offset": 13}),
    ]


async def test_the_server_records_when_each_chunk_went_out_when_asked(server: TestServer) -> None:
    server.app[SERVER_KEY].faults.update({"record_stream_times": True})
    await _raw_stream(server, {"model": "sim-gpt", "prompt": PROMPT, "max_tokens": 5, "stream": True})
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}/admin/stream-times") as resp:
            times = await resp.json()
        async with session.get(f"http://127.0.0.1:{server.port}/admin/stream-times") as resp:
            assert await resp.json() == {}  # read once
    assert list(times) == [PROMPT] and len(times[PROMPT]) == 5
    assert times[PROMPT] == sorted(times[PROMPT])
