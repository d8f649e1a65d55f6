"""streams/gateway/http.py read_body (sized and chunked bodies, 413s) and the single-text token count."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inferstream.errors import PayloadTooLarge
from inferstream.tokens import count_tokens, tokenizer
from streams.gateway.http import read_body

LIMIT = 1_000


async def echo(request: web.Request) -> web.Response:
    try:
        body = await read_body(request, LIMIT)
    except PayloadTooLarge:
        return web.Response(status=413)
    return web.Response(body=body)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/", echo)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_a_sized_body_is_read_whole(url: str) -> None:
    data = bytes(range(256)) * 3  # 768 bytes, under the limit
    async with aiohttp.ClientSession() as http, http.post(url, data=data) as resp:
        assert resp.status == 200
        assert await resp.read() == data


async def test_a_sized_body_at_the_limit_is_read_and_one_byte_over_is_413(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=b"x" * LIMIT) as resp:
            assert resp.status == 200
            assert await resp.read() == b"x" * LIMIT
        async with http.post(url, data=b"x" * (LIMIT + 1)) as resp:
            assert resp.status == 413


async def test_an_empty_sized_body_is_empty(url: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(url, data=b"") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_a_chunked_body_is_read_whole_and_413_past_the_limit(url: str) -> None:
    data = b"abc" * 300  # 900 bytes
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=chunks(data, 64)) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        async with http.post(url, data=chunks(b"y" * (LIMIT + 50), 64)) as resp:
            assert resp.status == 413


@pytest.mark.parametrize(
    "text", ["a short prompt to admit", "", "héllo wörld ✓ 汉字 unbelievably " * 40]
)
def test_one_text_counts_as_the_batch_encoder_counts_it(text: str) -> None:
    batch = tokenizer().encode_batch([text], add_special_tokens=False)
    assert count_tokens([text]) == len(batch[0].ids)
    assert count_tokens([text, text]) == 2 * len(batch[0].ids)
