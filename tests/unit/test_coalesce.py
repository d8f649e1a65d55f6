"""Writes issued in the same tick become one call."""

from __future__ import annotations

import asyncio

from inferstream.coalesce import Coalesced


async def test_concurrent_writes_share_one_call_and_its_failure() -> None:
    batches: list[list[int]] = []

    async def write(items: list[int]) -> None:
        batches.append(items)
        if 99 in items:
            raise OSError("down")

    writes: Coalesced[int, None] = Coalesced(write)
    await asyncio.gather(writes(1), writes(2), writes(3))
    assert batches == [[1, 2, 3]] and writes.calls == 1
    results = await asyncio.gather(writes(4), writes(99), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results) and batches[-1] == [4, 99]


async def test_every_caller_gets_the_combined_result_and_calls_apart_do_not_mix() -> None:
    async def count(items: list[str]) -> int:
        return len(items)

    coalesced: Coalesced[str, int] = Coalesced(count)
    assert await asyncio.gather(coalesced("a"), coalesced("b")) == [2, 2]
    assert await coalesced("c") == 1 and coalesced.calls == 2
