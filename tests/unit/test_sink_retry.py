"""The sink's retry policy, against an in-process stand-in for the store (no database needed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from bridges.clients.store.pool import unavailable
from bridges.clients.store.rows import Event
from bridges.sink import ResultSink, SinkStopped
from inferstream.errors import StoreUnavailable
from inferstream.settings import Settings
from schemas.records import ResultEvent

EVENTS = [
    ResultEvent(request_id=f"req_{i}", user_id="alice", status="completed", at=1.0)
    for i in range(3)
]


class FlakyStore:
    """Fails ``failures`` times with ``error``, then records what it was given."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.resets = 0
        self.written: list[Event] = []
        self.report_current: list[bool] = []

    async def upsert_events(
        self, items: Sequence[Event], *, report_current: bool = False
    ) -> list[dict[str, Any]]:
        self.calls += 1
        self.report_current.append(report_current)
        if self.calls <= self.failures:
            raise self.error
        self.written.extend(items)
        return [{"request_id": e.request_id} for e in items]

    async def reset(self) -> None:
        self.resets += 1


def sink(store: FlakyStore, on_applied: Any = None) -> ResultSink:
    return ResultSink(Settings(), store, on_applied, retry_base_s=0.001, retry_max_s=0.002)


@pytest.mark.parametrize(
    ("exc", "transient", "broken"),
    [
        (ConnectionRefusedError(111, "refused"), True, False),
        (TimeoutError(), True, False),
        (asyncpg.CannotConnectNowError("starting up"), True, False),
        (asyncpg.AdminShutdownError("terminating"), True, False),
        (asyncpg.InterfaceError("pool is closed"), True, True),
        (asyncpg.exceptions._base.InternalClientError("another operation is in progress"), True, True),
        (asyncpg.UndefinedTableError("no requests table"), False, False),
        (asyncpg.exceptions._base.DataError("bad parameter"), False, False),
        (ValueError("bug"), False, False),
    ],
)
def test_driver_errors_become_store_unavailable_at_the_boundary(
    exc: BaseException, transient: bool, broken: bool
) -> None:
    down = unavailable(exc)
    assert (down is not None) is transient
    if down is not None:
        assert down.broken_connection is broken and down.retry_after == 1
        assert down.message == "PostgreSQL is unavailable" and type(exc).__name__ in str(down)


async def test_retries_until_the_store_answers_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore(3, StoreUnavailable("ConnectionRefusedError: Connection refused"))
    applied: list[list[dict[str, Any]]] = []

    async def on_applied(rows: list[dict[str, Any]]) -> None:
        applied.append(rows)

    s = sink(store, on_applied)
    with caplog.at_level(logging.WARNING, logger="bridges.sink"):
        await s.write(EVENTS)
    assert store.written == EVENTS and s.failures == 3
    # Every attempt reports rows already applied: the first may be a replay after a crash.
    assert store.report_current == [True, True, True, True]
    assert len(applied) == 1 and [r["request_id"] for r in applied[0]] == [
        "req_0",
        "req_1",
        "req_2",
    ]
    failures = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert len(failures) == 3 and "Connection refused" in failures[0].getMessage()


async def test_a_closed_pool_is_reset() -> None:
    store = FlakyStore(1, StoreUnavailable("InterfaceError: pool is closed", broken_connection=True))
    await sink(store).write(EVENTS)
    assert store.resets == 1 and store.written == EVENTS


async def test_permanent_errors_are_raised_not_retried() -> None:
    store = FlakyStore(1, asyncpg.UndefinedTableError('relation "requests" does not exist'))
    with pytest.raises(asyncpg.UndefinedTableError):
        await sink(store).write(EVENTS)
    assert store.calls == 1


async def test_callback_errors_are_logged_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore(0, OSError())
    calls = 0

    async def broken(rows: list[dict[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("redis is down")

    with caplog.at_level(logging.ERROR, logger="bridges.sink"):
        await sink(store, broken).write(EVENTS)
    assert calls == 1 and store.calls == 1
    assert any("on_applied failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_stop_interrupts_a_waiting_write() -> None:
    store = FlakyStore(10**9, StoreUnavailable("ConnectionRefusedError: refused"))
    s = ResultSink(Settings(), store, retry_base_s=5.0, retry_max_s=5.0)
    task = asyncio.create_task(s.write(EVENTS))
    deadline = asyncio.get_running_loop().time() + 5
    while store.calls == 0:
        assert asyncio.get_running_loop().time() < deadline, "the write never reached the store"
        await asyncio.sleep(0.005)
    await s.stop()
    with pytest.raises(SinkStopped):
        await asyncio.wait_for(task, 2)
    assert store.written == []


async def test_empty_batch_is_a_no_op() -> None:
    store = FlakyStore(0, OSError())
    await sink(store).write([])
    assert store.calls == 0
