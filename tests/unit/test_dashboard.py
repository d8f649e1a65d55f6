"""The dashboard's numbers (registry snapshots, windows, percentiles), its CORS policy and its page headers."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inferstream.errors import ConfigurationError
from schemas.dashboard import DashboardStats
from streams.gateway import dashboard_metrics as dm
from streams.gateway.cors import CorsPolicy, parse_origins
from streams.gateway.dashboard import CSP, numbers


def test_quantile_interpolates_like_histogram_quantile() -> None:
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert dm.quantile(0.5, buckets) == pytest.approx(0.1)
    assert dm.quantile(0.7, buckets) == pytest.approx(0.3)
    assert dm.quantile(0.95, buckets) == pytest.approx(0.75)
    assert dm.quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    # Past the last finite bound: that bound, as Prometheus answers.
    assert dm.quantile(0.99, {1.0: 10.0, float("inf"): 20.0}) == 1.0


class Fake:
    """A registry of its own and a clock the test moves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.t = 1000.0
        self.admissions = Counter("inferstream_admissions_total", "a", ["outcome"], registry=self.registry)
        self.calls = Histogram(
            "inferstream_model_call_seconds", "c", ["task", "model", "backend"],
            buckets=(0.1, 0.5, 1.0), registry=self.registry,
        )  # fmt: skip
        self.breaker = Gauge(
            "inferstream_model_breaker_state", "b", ["task", "model", "backend"], registry=self.registry
        )
        self.depth = Gauge("inferstream_queue_depth", "q", ["task", "model", "priority"], registry=self.registry)
        Counter("other_total", "not ours", registry=self.registry).inc()

    def take(self) -> dm.Snapshot:
        return dm.take_snapshot(self.registry, now=lambda: self.t)


def test_window_rates_and_percentiles_follow_the_last_window() -> None:
    f = Fake()
    window = dm.Window(f.take, window_s=60, min_interval_s=1)
    for _ in range(100):
        f.calls.labels("generate", "m", "a").observe(0.05)  # before the window: fast
    f.admissions.labels("accepted").inc(10)
    new, old = window.latest(now=f.t)
    assert old is None and dm.rate(new, old, "inferstream_admissions_total") == (10, 0.0)
    for _ in range(4):
        f.t += 30
        f.admissions.labels("accepted").inc(30)
        f.admissions.labels("rate_limited").inc(3)
        for _ in range(10):
            f.calls.labels("generate", "m", "b").observe(0.7)  # now: slow
        new, old = window.latest(now=f.t)
    assert old is not None and new.at - old.at == 60  # the oldest kept is one window back
    total, per_s = dm.rate(new, old, "inferstream_admissions_total", outcome="accepted") or (0, 0)
    assert (total, per_s) == (130, 1.0)
    stats = dm.latency(new, old, "inferstream_model_call_seconds")
    assert stats is not None and stats["count"] == 20
    assert 0.5 < stats["p50"] <= 1.0  # the fast calls before the window do not count
    assert dm.rate(new, old, "absent_total") is None and dm.latency(new, old, "absent_seconds") is None
    assert "other_total" not in new.samples


def test_window_takes_at_most_one_snapshot_per_interval() -> None:
    f = Fake()
    taken: list[float] = []

    def take() -> dm.Snapshot:
        taken.append(f.t)
        return f.take()

    window = dm.Window(take, window_s=60, min_interval_s=1)
    window.latest(now=f.t)
    window.latest(now=f.t + 0.5)
    window.latest(now=f.t + 1.0)
    assert len(taken) == 2


def test_numbers_fit_the_stats_document() -> None:
    import msgspec

    f = Fake()
    f.admissions.labels("admitted").inc(3)
    f.admissions.labels("rate_limited").inc(2)
    f.calls.labels("generate", "m", "a").observe(0.2)
    f.breaker.labels("generate", "m", "a").set(2)
    f.breaker.labels("generate", "m", "b").set(0)
    f.depth.labels("generate", "m", "all").set(7)
    part = numbers(f.take(), None)
    assert [b["state"] for b in part["breakers"]] == ["open", "closed"]
    assert [(r["name"], r["total"]) for r in part["throughput"]] == [
        ("admitted", 3), ("admissions (all)", 5), ("refused: rate_limited", 2)
    ]
    assert part["queues"] == [{"task": "generate", "model": "m", "priority": "all", "depth": 7.0}]
    assert part["dead_letters_total"] is None and part["sse_clients"] is None
    doc = {
        "worker": "http://127.0.0.1:1", "roles": ["ml"], "at": 1.0, "window_s": 0.0, "user_id": "u",
        "admin": False, "recent_failures": [], **part,
    }  # fmt: skip
    msgspec.convert(doc, DashboardStats)  # the served document is the one the spec describes


def test_parse_origins_refuses_wildcards_and_non_origins() -> None:
    assert parse_origins(" http://127.0.0.1:8080/, HTTPS://App.Example.com ,") == frozenset(
        {"http://127.0.0.1:8080", "https://app.example.com"}
    )
    assert parse_origins("") == frozenset()
    for bad in ("*", "app.example.com"):
        with pytest.raises(ConfigurationError, match="not an origin"):
            parse_origins(bad)


async def _prepared(policy: CorsPolicy, method: str, path: str, headers: dict[str, str], resp_headers: dict[str, str] | None = None) -> web.Response:
    request = make_mocked_request(method, path, headers=headers)
    response = web.Response(status=200, headers=resp_headers)
    await policy.on_prepare(request, response)
    return response


async def test_cors_echoes_a_listed_origin_only() -> None:
    policy = CorsPolicy(frozenset({"http://127.0.0.1:8080"}))
    ok = await _prepared(policy, "GET", "/v1/requests/x/events", {"Origin": "http://127.0.0.1:8080"})
    assert ok.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8080"
    assert ok.headers["Vary"] == "Origin"
    assert "Access-Control-Allow-Credentials" not in ok.headers
    other = await _prepared(policy, "GET", "/v1/quota", {"Origin": "http://127.0.0.1:9999"})
    assert "Access-Control-Allow-Origin" not in other.headers and other.headers["Vary"] == "Origin"
    none = await _prepared(policy, "GET", "/v1/quota", {})
    assert "Access-Control-Allow-Origin" not in none.headers
    ops = await _prepared(policy, "GET", "/metrics", {"Origin": "http://127.0.0.1:8080"})
    assert "Access-Control-Allow-Origin" not in ops.headers and "Vary" not in ops.headers


async def test_cors_preflight_and_forwarded_answers() -> None:
    policy = CorsPolicy(frozenset({"http://127.0.0.1:8080"}))
    pre = await _prepared(
        policy, "OPTIONS", "/v1/requests/x/events/token",
        {"Origin": "http://127.0.0.1:8080", "Access-Control-Request-Method": "POST"},
    )  # fmt: skip
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    # An owner's answer relayed by another worker: its CORS headers are replaced, never doubled.
    relayed = await _prepared(
        policy, "GET", "/v1/quota", {"Origin": "http://evil.example"},
        {"Access-Control-Allow-Origin": "http://evil.example", "Vary": "Accept-Encoding, Origin"},
    )  # fmt: skip
    assert "Access-Control-Allow-Origin" not in relayed.headers
    assert relayed.headers["Vary"] == "Accept-Encoding, Origin"


def test_the_page_policy_allows_only_its_own_script() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert "unsafe" not in CSP


def test_the_page_writes_no_markup_from_data_and_has_nothing_inline() -> None:
    import re

    from streams.gateway.dashboard import _asset

    script = _asset("app.js").decode()
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    html = _asset("index.html").decode()
    # The CSP forbids inline script and style: the page must not need them.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and "<style" not in html and " style=" not in html
    assert not re.search(r"\bon[a-z]+=", html)
