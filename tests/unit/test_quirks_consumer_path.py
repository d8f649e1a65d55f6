"""The consumer-path work-arounds (streams.quirks: deliver_eagerly, yield_every, LeanMonitor, and the
``cython_optimizations`` setting): each test fails if its work-around stops working, or if the Faust
behaviour it works around changes (then the work-around can go)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from types import SimpleNamespace
from typing import Any

import faust
import mode
import pytest
from faust.transport.consumer import Consumer

from inferstream.settings import Settings
from streams import quirks
from streams.application import build_app


def finishes_without_suspending(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive ``coro`` by hand, outside any loop: its result if it never suspends (else the test fails)."""
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    return done.value.value


# ---- deliver_eagerly ------------------------------------------------------------------------------


def test_faust_drains_each_message_through_wait_first() -> None:
    """The root cause: the drain loop races every message's callback in Service.wait_first (four tasks)."""
    source = inspect.getsource(Consumer._drain_messages)
    assert "self.wait_first(" in source and "callback(message)" in source


def test_a_callback_that_does_not_suspend_is_answered_without_a_loop_trip() -> None:
    quirks.deliver_eagerly()
    service = mode.Service()
    suspend = asyncio.Event()

    async def callback() -> str:
        return "delivered"

    waiting = suspend.wait()
    results = finishes_without_suspending(Consumer.wait_first(service, callback(), waiting))  # type: ignore[arg-type]
    assert results.results == ["delivered"] and not results.stopped
    assert (
        inspect.getcoroutinestate(waiting) == inspect.CORO_CLOSED
    )  # closed, never left "never awaited"


def test_without_the_work_around_the_same_call_suspends() -> None:
    quirks.deliver_eagerly()
    faust_own = Consumer.wait_first.__wrapped__  # type: ignore[attr-defined]

    async def check() -> None:
        async def callback() -> str:
            return "delivered"

        coro = faust_own(mode.Service(), callback(), asyncio.Event().wait())
        try:
            suspended = coro.send(None) is not None or True
        except StopIteration:
            suspended = False
        coro.close()
        assert suspended

    asyncio.run(check())


def test_a_callback_that_suspends_finishes_in_a_task_with_its_result() -> None:
    quirks.deliver_eagerly()

    async def check() -> None:
        service = mode.Service()
        release = asyncio.Event()
        steps: list[str] = []

        async def callback() -> str:
            steps.append("before")
            await release.wait()
            await asyncio.sleep(0)
            steps.append("after")
            return "delivered"

        waiting = asyncio.ensure_future(
            Consumer.wait_first(service, callback(), asyncio.Event().wait())
        )
        await asyncio.sleep(0)
        assert steps == ["before"] and not waiting.done()
        release.set()
        results = await asyncio.wait_for(waiting, 5)
        assert results.results == ["delivered"] and steps == ["before", "after"]

    asyncio.run(check())


def test_a_suspended_callback_is_cancelled_when_the_flow_is_suspended() -> None:
    """As in Faust's own: suspend_flow wins the race and the callback still waiting is cancelled."""
    quirks.deliver_eagerly()

    async def check() -> None:
        service = mode.Service()
        suspend = asyncio.Event()
        cancelled = asyncio.Event()

        async def callback() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        waiting = asyncio.ensure_future(Consumer.wait_first(service, callback(), suspend))
        await asyncio.sleep(0)
        suspend.set()
        results = await asyncio.wait_for(waiting, 5)
        assert results.done == [suspend] and not results.stopped
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(check())


def test_a_callback_error_propagates() -> None:
    quirks.deliver_eagerly()

    async def callback() -> None:
        raise ValueError("bad record")

    waiting = asyncio.Event().wait()
    with pytest.raises(ValueError, match="bad record"):
        Consumer.wait_first(mode.Service(), callback(), waiting).send(None)  # type: ignore[arg-type]
    waiting.close()


def test_installing_twice_wraps_faust_once() -> None:
    quirks.deliver_eagerly()
    first = Consumer.wait_first.__wrapped__  # type: ignore[attr-defined]
    quirks.deliver_eagerly()
    assert Consumer.wait_first.__wrapped__ is first  # type: ignore[attr-defined]
    assert first is mode.Service.wait_first


# ---- yield_every -----------------------------------------------------------------------------------


def test_faust_cython_stream_iterator_yields_before_every_event() -> None:
    """The root cause, and what the work-around replaces: ``sleep`` as that module resolves it."""
    from faust import streams as fstreams
    from faust._cython import streams as cstreams

    assert (
        fstreams._CStreamIterator is cstreams.StreamIterator
    )  # the Cython iterator is the one in use
    assert getattr(cstreams.sleep, "__wrapped__", cstreams.sleep) is asyncio.sleep


class Values:
    """A channel that always has a value ready (not a ChannelT: the iterator awaits ``__anext__``)."""

    async def __anext__(self) -> int:
        return 1


def fake_stream() -> Any:
    """Just what Faust's Cython ``StreamIterator`` reads from a stream, its app and its channel."""

    async def on_merge(value: Any) -> Any:
        return value

    app = SimpleNamespace(
        conf=faust.App("t-yield-every", broker="kafka://127.0.0.1:1").conf,
        topics=SimpleNamespace(acks_enabled_for=lambda topic: False, _acking_topics=set()),
        consumer=SimpleNamespace(_unacked_messages=set()),
    )
    return SimpleNamespace(
        channel=Values(),
        app=app,
        loop=None,
        on_merge=on_merge,
        _on_stream_event_in=None,
        _on_stream_event_out=None,
        _on_message_in=None,
        _on_message_out=None,
        _skipped_value=object(),
        _processors=[],
        enable_acks=False,
        _set_current_event=lambda event: None,
    )


async def loop_trips_while_reading(events: int) -> int:
    """How many times a task that yields in a loop ran while Faust's stream iterator read ``events`` values."""
    from faust._cython.streams import StreamIterator

    it = StreamIterator(fake_stream())
    trips = 0

    async def ticker() -> None:
        nonlocal trips
        while True:
            trips += 1
            await asyncio.sleep(0)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    start = trips
    for _ in range(events):
        value, _state = await it.next()
        assert value == 1
    tick.cancel()
    return trips - start


def test_a_stream_yields_once_every_n_events() -> None:
    from faust._cython import streams as cstreams

    original = getattr(cstreams.sleep, "__wrapped__", cstreams.sleep)
    try:
        cstreams.sleep = original
        stock = asyncio.run(loop_trips_while_reading(640))
        quirks.yield_every(64)
        lean = asyncio.run(loop_trips_while_reading(640))
    finally:
        quirks.yield_every()
    assert stock >= 640  # one trip per event at least, as Faust ships
    assert lean == 640 // 64  # it still yields, once every 64


def test_a_delay_is_still_slept() -> None:
    quirks.yield_every(64)

    async def check() -> None:
        from faust._cython import streams as cstreams

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await cstreams.sleep(0.05)
        assert loop.time() - t0 >= 0.04

    asyncio.run(check())


# ---- LeanMonitor and cython_optimizations -----------------------------------------------------------


def test_the_app_uses_the_lean_monitor_and_the_cython_fast_paths() -> None:
    app = build_app(Settings(namespace="t-lean", broker_url="kafka://127.0.0.1:1"))
    assert isinstance(app.monitor, quirks.LeanMonitor)
    assert app.conf.cython_optimizations is True
    # The setting does nothing unless the extensions were built and are the ones in use.
    from faust.transport import conductor

    assert conductor.ConductorHandler is not None


def test_faust_decodes_once_per_agent_without_the_setting() -> None:
    """The root cause: the shipped default leaves the Cython conductor's decode-once path off."""
    app = faust.App("t-cyopt", broker="kafka://127.0.0.1:1")
    assert app.conf.cython_optimizations is False


def test_the_lean_monitor_keeps_what_faust_stall_detector_reads() -> None:
    monitor = quirks.LeanMonitor()
    tp = faust.types.TP("t", 0)
    state = monitor.on_stream_event_in(tp, 7, None, None)  # type: ignore[arg-type]
    assert state is None  # nothing for on_stream_event_out to time
    assert tp in monitor.stream_inbound_time
    monitor.on_stream_event_out(tp, 7, None, None, state)  # type: ignore[arg-type]
    assert monitor.events_total == 0 and monitor.messages_received_total == 0
