"""Backend choice per call (workers/backends.py): weighted split, breakers dropping backends out, fallbacks, probes.

No model server: the pools are built from parsed routes and ModelClient is never called.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from inferstream.errors import RetryableModelError
from inferstream.routes import Route, parse_routes
from inferstream.settings import Settings
from tests.support.wait import wait_for
from workers.backends import BackendPool, Upstream
from workers.endpoint import Endpoint

SETTINGS = Settings(namespace="tbackends")


def route_of(*backends: tuple[str, float, int], threshold: int = 2, reset_s: float = 60.0) -> Route:
    """A generate route with backends given as (name, weight, order), each on its own loopback port."""
    lines = [
        "routes:",
        "  - task: generate",
        "    model: sim-gpt",
        f"    breaker: {{threshold: {threshold}, reset_s: {reset_s}}}",
        "    backends:",
    ]
    for port, (name, weight, order) in enumerate(backends, start=9100):
        lines.append(
            f"      - {{name: {name}, url: 'http://127.0.0.1:{port}/v1', model: sim-gpt, weight: {weight}, order: {order}}}"
        )
    table = parse_routes("\n".join(lines) + "\n", source="routes.yaml", fmt="yaml", settings=SETTINGS, environ={})
    (route,) = table.routes
    return route


@pytest.fixture
async def pools() -> Any:
    made: list[BackendPool] = []

    def make(*backends: tuple[str, float, int], **breaker: Any) -> BackendPool:
        pool = BackendPool(SETTINGS, route_of(*backends, **breaker))
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


def picks(pool: BackendPool, n: int) -> list[str]:
    """``n`` choices, each call answered at once (closed breakers stay closed)."""
    out = []
    for _ in range(n):
        picked = pool.pick()
        assert picked is not None, "no backend could take a call"
        upstream, probe = picked
        pool.succeeded(upstream, probe)
        out.append(upstream.name)
    return out


def open_breaker(pool: BackendPool, name: str) -> Upstream:
    upstream = pool.by_name(name)
    for _ in range(upstream.breaker.threshold):
        pool.failed(upstream, False)
    assert upstream.breaker.state == "open"
    return upstream


def test_weighted_split_is_exact_and_interleaved(pools: Any) -> None:
    pool = pools(("a", 3, 1), ("b", 1, 1))
    chosen = picks(pool, 400)
    assert Counter(chosen) == {"a": 300, "b": 100}
    # Smooth WRR: every run of sum-of-weights calls holds each backend exactly weight times (no "a a a ... b b").
    for start in range(len(chosen) - 3):
        assert Counter(chosen[start : start + 4]) == {"a": 3, "b": 1}, chosen[start : start + 4]


def test_three_way_split_and_fallbacks_idle_while_the_first_order_serves(pools: Any) -> None:
    pool = pools(("a", 2, 1), ("b", 1, 1), ("c", 1, 1), ("spare", 5, 2))
    chosen = picks(pool, 400)
    assert Counter(chosen) == {"a": 200, "b": 100, "c": 100}


def test_an_open_backend_drops_out_and_its_share_goes_to_its_order(pools: Any) -> None:
    pool = pools(("a", 3, 1), ("b", 1, 1), ("c", 1, 1), ("spare", 1, 2))
    open_breaker(pool, "a")
    assert Counter(picks(pool, 200)) == {"b": 100, "c": 100}
    assert pool.accepting and not pool.probing and pool.state == "closed"


def test_a_whole_order_out_sends_the_calls_to_the_next_order(pools: Any) -> None:
    pool = pools(("a", 1, 1), ("b", 1, 1), ("spare", 1, 2), ("last", 1, 3))
    open_breaker(pool, "a")
    open_breaker(pool, "b")
    assert set(picks(pool, 20)) == {"spare"}
    open_breaker(pool, "spare")
    assert set(picks(pool, 20)) == {"last"}
    open_breaker(pool, "last")
    assert pool.pick() is None
    assert not pool.accepting and pool.probing and pool.state == "open"


async def test_a_half_open_primary_gets_one_probe_while_the_fallback_serves(pools: Any) -> None:
    pool = pools(("primary", 1, 1), ("fallback", 1, 2), reset_s=0.1)
    primary = open_breaker(pool, "primary")
    assert set(picks(pool, 5)) == {"fallback"}
    await wait_for(lambda: primary.breaker.state == "half_open", timeout=5, what="the primary to half-open")
    assert primary.breaker.probe_free

    probe = pool.pick()
    assert probe == (primary, True)
    # The probe is out: every other call goes to the fallback, none to the primary.
    others = [pool.pick() for _ in range(10)]
    assert all(p is not None and p[0].name == "fallback" and p[1] is False for p in others)
    assert pool.health()["primary"]["breaker"] == "half_open"

    pool.succeeded(primary, True)  # the probe answered: the primary takes its calls back
    assert primary.breaker.state == "closed"
    assert set(picks(pool, 10)) == {"primary"}


async def test_a_failed_probe_reopens_the_primary_and_the_fallback_keeps_serving(pools: Any) -> None:
    pool = pools(("primary", 1, 1), ("fallback", 1, 2), reset_s=0.1)
    primary = open_breaker(pool, "primary")
    await wait_for(lambda: primary.breaker.probe_free, timeout=5, what="the primary's probe")
    assert pool.pick() == (primary, True)
    pool.failed(primary, True)
    assert primary.breaker.state == "open"
    assert set(picks(pool, 5)) == {"fallback"}


async def test_acquire_waits_while_every_breaker_is_open_and_returns_the_probe(pools: Any) -> None:
    pool = pools(("a", 1, 1), ("b", 1, 2), reset_s=1.0)  # long enough that the checks below run while open
    open_breaker(pool, "a")
    open_breaker(pool, "b")
    assert pool.pick() is None and not pool.accepting
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)  # one loop turn: it has looked and found nothing (not a synchronisation wait)
    assert not waiter.done()
    upstream, probe = await asyncio.wait_for(waiter, 5)
    assert probe is True and upstream.name == "a"  # the lowest order probes first
    assert pool.probing and pool.state == "half_open"


async def test_acquire_waits_for_the_probe_out_and_returns_when_it_closes(pools: Any) -> None:
    pool = pools(("only", 1, 1), reset_s=0.1)
    only = open_breaker(pool, "only")
    await wait_for(lambda: only.breaker.probe_free, timeout=5, what="the probe")
    assert pool.pick() == (only, True)
    assert not pool.accepting and pool.probing  # half-open, its probe taken
    waiter = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    pool.succeeded(only, True)
    assert await asyncio.wait_for(waiter, 5) == (only, False)


def test_accepting_probing_state_and_health(pools: Any) -> None:
    pool = pools(("a", 3, 1), ("b", 1, 2))
    assert pool.accepting and not pool.probing and pool.state == "closed"
    pool.failed(pool.by_name("a"), False)
    health = pool.health()
    # No URL: /readyz, which shows it, is unauthenticated.
    assert health == {
        "a": {"model": "sim-gpt", "weight": 3, "order": 1, "breaker": "closed", "consecutive_failures": 1},
        "b": {"model": "sim-gpt", "weight": 1, "order": 2, "breaker": "closed", "consecutive_failures": 0},
    }
    open_breaker(pool, "a")
    assert pool.health()["a"]["breaker"] == "open"
    assert pool.accepting and pool.state == "closed"  # b is closed
    open_breaker(pool, "b")
    assert not pool.accepting and pool.probing and pool.state == "open"


async def test_endpoint_call_names_the_failing_backend_and_counts_only_its_breaker() -> None:
    endpoint = Endpoint(SETTINGS, route_of(("bad", 1, 1), ("good", 1, 1), threshold=1))
    calls: list[str] = []

    async def call(upstream: Upstream) -> str:
        calls.append(upstream.name)
        if upstream.name == "bad":
            raise RetryableModelError("model answered 503", status=503)
        return "answer"

    try:
        with pytest.raises(RetryableModelError) as raised:
            await endpoint.call(call)
        assert raised.value.backend == "bad"
        pool = endpoint.pool
        assert pool.by_name("bad").breaker.state == "open"  # threshold 1
        assert pool.by_name("good").breaker.consecutive_failures == 0
        assert pool.by_name("good").breaker.state == "closed"
        assert [await endpoint.call(call) for _ in range(3)] == [("answer", "good")] * 3
        assert calls == ["bad", "good", "good", "good"]
    finally:
        await endpoint.close()
