"""Dynamic batching: size and time triggers, splitting results and usage, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from inferstream.errors import RetryableModelError
from workers.batching import Batcher, split_usage


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, texts: list[str]) -> tuple[list[list[float]], dict[str, int], str]:
        self.calls.append(texts)
        await asyncio.sleep(0)
        if self.fail:
            raise RetryableModelError("down", status=503)
        usage = {"prompt_tokens": 10 * len(texts), "total_tokens": 10 * len(texts)}
        return [[float(len(t))] for t in texts], usage, f"backend-{len(self.calls)}"


async def test_fills_to_max_items_then_splits_back() -> None:
    rec = Recorder()
    b = Batcher(rec, max_items=4, max_wait_s=10)
    results = await asyncio.gather(b.submit(["a"]), b.submit(["bb", "ccc"]), b.submit(["dddd"]))
    assert rec.calls == [["a", "bb", "ccc", "dddd"]]
    assert [r[0] for r in results] == [[[1.0]], [[2.0], [3.0]], [[4.0]]]
    assert sum(r[1]["prompt_tokens"] for r in results) == 40
    assert {r[2] for r in results} == {"backend-1"}  # every request learns its batch's backend


async def test_time_trigger_and_requests_never_split() -> None:
    rec = Recorder()
    b = Batcher(rec, max_items=3, max_wait_s=0.01)
    await asyncio.gather(b.submit(["a", "b"]), b.submit(["c", "d"]), b.submit(["e", "f", "g", "h"]))
    assert sorted(len(c) for c in rec.calls) == [2, 2, 4]


async def test_failure_reaches_every_waiter() -> None:
    b = Batcher(Recorder(fail=True), max_items=2, max_wait_s=10)
    results = await asyncio.gather(b.submit(["a"]), b.submit(["b"]), return_exceptions=True)
    assert all(isinstance(r, RetryableModelError) for r in results)


async def test_cancelled_before_flush_leaves_the_batch() -> None:
    rec = Recorder()
    b = Batcher(rec, max_items=10, max_wait_s=0.05)
    doomed = asyncio.ensure_future(b.submit(["x"]))
    kept = asyncio.ensure_future(b.submit(["y"]))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert (await kept)[0] == [[1.0]]
    assert rec.calls == [["y"]]


def test_split_usage_sums_exactly() -> None:
    parts = split_usage({"prompt_tokens": 10, "total_tokens": 10}, [1, 1, 1])
    assert sorted(p["prompt_tokens"] for p in parts) == [3, 3, 4]
    assert sum(p["total_tokens"] for p in parts) == 10
    assert split_usage({"prompt_tokens": 7}, [5]) == [{"prompt_tokens": 7}]
    assert [p["prompt_tokens"] for p in split_usage({"prompt_tokens": 9}, [1, 2])] == [3, 6]


async def test_works_when_the_loop_returns_plain_handles_for_a_time_already_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop's ``call_at`` for a time already reached returns a ``Handle`` without ``when()``.

    The batcher asked its timer for ``when()`` on the next submission: AttributeError inside
    the ML worker's message handler, whose message then stayed unacked and its request
    ``dispatched`` for ever (seen under load during the PostgreSQL outage test).
    """
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "call_at", lambda when, callback, *args: loop.call_soon(callback, *args))
    rec = Recorder()
    b = Batcher(rec, max_items=10, max_wait_s=0.05)
    results = await asyncio.gather(b.submit(["a"]), b.submit(["b"]), b.submit(["c"]))
    assert [r[0] for r in results] == [[[1.0]], [[1.0]], [[1.0]]]
