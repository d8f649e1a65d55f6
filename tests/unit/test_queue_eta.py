"""Queue position and ETA (streams.queue_eta) and the deadline check of admission: pure arithmetic, no services."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from inferstream import clock
from inferstream.errors import DeadlineUnreachable
from inferstream.settings import Settings
from schemas.api import parse_submission
from streams import queue_eta
from streams.admission import AdmissionService
from streams.gateway.errors import http_status
from streams.queue_eta import BASE_S, POLL_S, QueueEta, RouteState


def test_first_look_gives_deliveries_to_the_highest_priority_first() -> None:
    s = RouteState()
    s.observe(100.0, {"high": 5, "normal": 10, "low": 10}, ready=12, consumers=1)
    assert (s.pending("high"), s.pending("normal"), s.pending("low")) == (0, 2, 10)


def test_new_deliveries_drain_the_higher_priority_that_arrived_later() -> None:
    s = RouteState()
    s.observe(100.0, {"normal": 10}, ready=10, consumers=1)
    # 3 high arrive, 4 messages delivered in the meantime: the 3 high, then one normal.
    s.observe(100.25, {"normal": 10, "high": 3}, ready=9, consumers=1)
    assert (s.pending("high"), s.pending("normal")) == (0, 9)


def test_a_redelivery_does_not_count_as_consumption_twice() -> None:
    s = RouteState()
    s.observe(100.0, {"normal": 10}, ready=5, consumers=1)
    s.observe(100.25, {"normal": 10}, ready=7, consumers=1)  # two messages requeued
    s.observe(100.5, {"normal": 10}, ready=5, consumers=1)
    assert s.pending("normal") == 5


def test_rate_is_measured_while_backlogged_and_kept_when_idle() -> None:
    s = RouteState()
    # 40 dispatched, delivered at 8 per poll (32/s), backlog throughout.
    for i in range(5):
        s.observe(100.0 + i * POLL_S, {"normal": 40}, ready=40 - 8 * i, consumers=1)
    assert s.rate == pytest.approx(32.0)
    s.observe(101.25, {"normal": 40}, ready=0, consumers=1)
    assert s.rate == pytest.approx(32.0)


def test_estimate_counts_higher_priorities_own_earlier_ones_and_the_prefetched() -> None:
    s = RouteState(buffer_per_consumer=48)
    s.rate = 10.0
    s.observe(100.0, {"high": 3, "normal": 20}, ready=23, consumers=2)
    new_normal = s.estimate("normal")
    assert new_normal.ahead == 3 + 20 + 96
    assert new_normal.eta_s == pytest.approx(BASE_S + 119 / 10.0)
    assert s.estimate("high").ahead == 3 + 96
    assert s.estimate("low").ahead == 23 + 96


def test_a_request_created_earlier_is_behind_only_what_was_dispatched_before_it() -> None:
    s = RouteState()
    s.rate = 10.0
    s.observe(100.0, {"normal": 10}, ready=10, consumers=0)
    s.observe(101.0, {"normal": 20}, ready=20, consumers=0)
    s.observe(102.0, {"normal": 30}, ready=25, consumers=0)  # 5 delivered
    # created at 100.5 - BASE_S: dispatched halfway between the first two polls, ticket 15.
    est = s.estimate("normal", 100.5 - BASE_S)
    assert est.ahead == 15 - 5
    assert s.estimate("normal", None).ahead == 25


def test_an_empty_queue_starts_at_once_and_no_rate_means_no_eta() -> None:
    s = RouteState()
    s.observe(100.0, {"normal": 10}, ready=0, consumers=1)
    assert s.estimate("normal") == queue_eta.Estimate(0, BASE_S)
    s.observe(100.25, {"normal": 15}, ready=5, consumers=1)
    assert s.estimate("normal").eta_s is None


def test_annotate_adds_queue_to_waiting_docs_only() -> None:
    eta = QueueEta()
    state = eta.routes[("generate", "m")] = RouteState()
    state.rate = 2.0
    state.observe(clock.now(), {"normal": 4}, ready=4, consumers=0)
    doc: dict[str, Any] = {"status": "queued", "task": "generate", "model": "m", "priority": "normal",
                           "created_at": clock.iso(clock.now() + 1)}  # fmt: skip
    annotated = eta.annotate(doc)
    assert annotated["queue"] == {"position": 5, "ahead": 4, "eta_s": round(BASE_S + 2.0, 3)}
    assert "queue" not in doc  # a copy: the doc may be shared by several streams
    running = {**doc, "status": "running"}
    assert "queue" not in eta.annotate(running)
    unknown = {**running, "status": "dispatched", "model": "other"}
    assert "queue" not in eta.annotate(unknown)  # first sight of the route: polled from now on
    assert ("generate", "other") in eta.routes


def test_dispatched_counts_in_memory_by_route_and_plain_priority() -> None:
    eta = QueueEta()
    reqs = [SimpleNamespace(task="embed", model="e", priority=p) for p in ("high", "low", "low")]
    eta.dispatched(reqs)  # type: ignore[arg-type]
    assert eta._unflushed == {(("embed", "e"), "high"): 1, (("embed", "e"), "low"): 2}


def test_retry_after_is_at_least_a_second() -> None:
    assert queue_eta.retry_after(3.2, 10) == 1
    assert queue_eta.retry_after(12.2, 10) == 3


def _admission(eta: QueueEta) -> AdmissionService:
    svc = AdmissionService(
        Settings(), keys=None, router=None, quota=None, idempotency=None, topics=None,  # type: ignore[arg-type]
        redis=SimpleNamespace(cache_docs=None), routes=None,  # type: ignore[arg-type]
    )  # fmt: skip
    svc.eta = eta
    return svc


def _sub(**extra: Any) -> Any:
    body = {"task": "generate", "model": "m", "input": "hi", **extra}
    return parse_submission(json.dumps(body).encode(), {"generate": ["m"]})


def test_a_strict_deadline_shorter_than_the_eta_is_refused_with_the_eta() -> None:
    eta = QueueEta()
    state = eta.routes[("generate", "m")] = RouteState()
    state.rate = 1.0
    state.observe(clock.now(), {"normal": 30}, ready=30, consumers=0)
    svc = _admission(eta)
    with pytest.raises(DeadlineUnreachable) as refused:
        svc._check_deadline(_sub(deadline_s=5), "normal")
    exc = refused.value
    assert http_status(exc) == 429
    body = exc.body()["error"]
    assert body["type"] == "deadline_unreachable"
    assert body["eta_s"] == pytest.approx(BASE_S + 30.0)
    assert body["queue"]["ahead"] == 30
    assert exc.retry_after == 26
    svc._check_deadline(_sub(deadline_s=60), "normal")  # reachable: no refusal


def test_no_estimate_admits() -> None:
    svc = _admission(QueueEta())
    svc._check_deadline(_sub(deadline_s=1), "normal")  # route never polled
