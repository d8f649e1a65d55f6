"""Lookups and writes issued in the same tick become one call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from inferstream.coalesce import Coalesced, CoalescedLookup


async def test_concurrent_lookups_share_one_call() -> None:
    seen: list[list[str]] = []

    async def lookup(ids: Sequence[str]) -> set[str]:
        seen.append(list(ids))
        return {"b", "d"} & set(ids)

    coalesced = CoalescedLookup(lookup)
    results = await asyncio.gather(coalesced(["a"]), coalesced(["b"]), coalesced(["c", "d"]))
    assert results == [set(), {"b"}, {"d"}]
    assert seen == [["a", "b", "c", "d"]] and coalesced.calls == 1
    assert await coalesced(["b"]) == {"b"} and coalesced.calls == 2


async def test_a_failed_lookup_fails_every_waiter() -> None:
    async def lookup(ids: Sequence[str]) -> set[str]:
        raise ConnectionError("redis down")

    coalesced = CoalescedLookup(lookup)
    results = await asyncio.gather(coalesced(["a"]), coalesced(["b"]), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        await coalesced(["c"])


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
