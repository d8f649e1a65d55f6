"""Cancellation lookups issued in the same tick become one call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from workers.coalesce import CoalescedLookup


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
