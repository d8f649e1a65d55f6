"""A send through a started producer takes no trip through the event loop (streams.quirks.started_producer).

Faust's ``App.maybe_start_producer`` is wrapped by mode's ``@stampede``, whose call begins
with ``await asyncio.sleep(0)``: every ``Topic.send`` and table changelog write yielded to
the loop once, which let aiokafka's sender flush after each record (one produce request
per record). ``InferstreamApp`` returns the started producer without that trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import faust
import pytest

from streams.application import InferstreamApp


def suspends(coro: Coroutine[Any, Any, Any]) -> bool:
    """Whether ``coro`` suspends before it finishes (drives it by hand, outside any loop)."""
    try:
        coro.send(None)
    except StopIteration:
        return False
    coro.close()
    return True


def started(app: faust.App) -> faust.App:
    app.producer._started.set()  # type: ignore[attr-defined]  # as mode marks a started service
    return app


def test_faust_own_version_yields_once_per_call() -> None:
    """The root cause: if a Faust or mode release drops the forced yield, the quirk can go."""
    app = started(faust.App("t-yield", broker="kafka://127.0.0.1:1"))
    assert suspends(app.maybe_start_producer())


def test_started_producer_is_returned_without_suspending() -> None:
    app = started(InferstreamApp("t-noyield", broker="kafka://127.0.0.1:1"))
    coro = app.maybe_start_producer()
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value is app.producer


def test_a_producer_not_started_yet_is_started_by_faust() -> None:
    app = InferstreamApp("t-start", broker="kafka://127.0.0.1:1")
    calls: list[str] = []

    async def maybe_start() -> bool:
        calls.append("start")
        return True

    app.producer.maybe_start = maybe_start  # type: ignore[method-assign]
    assert asyncio.run(app.maybe_start_producer()) is app.producer
    assert calls == ["start"]
