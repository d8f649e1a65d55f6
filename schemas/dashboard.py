"""The documents of ``/dashboard/api/*``: what the live dashboard page reads (typed, part of ``/openapi.json``)."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from schemas.documents import QuotaDoc


class Rate(Struct):
    """A counter: its total since the worker started and its rate over the window."""

    name: str
    total: float
    per_s: float


class Latency(Struct):
    """A stage's histogram within the window (seconds; None: no observation in the window)."""

    stage: str
    metric: str
    count: float
    p50: float | None
    p90: float | None
    p99: float | None


class QueueDepth(Struct):
    task: str
    model: str
    priority: str
    depth: float


class Lag(Struct):
    topic: str
    partition: str
    lag: float


class BreakerState(Struct):
    task: str
    model: str
    backend: str
    state: Literal["closed", "half-open", "open", "unknown"]


class DeadLetterCount(Struct):
    task: str
    model: str
    total: float


class RecentFailure(Struct):
    """A failed request: dead letters for an admin, the caller's own failed requests otherwise."""

    request_id: str
    user_id: str
    task: str
    model: str
    type: str
    message: str
    at: str | None


class DashboardStats(Struct):
    """``GET /dashboard/api/stats``: this worker's numbers; ``window_s`` is the span rates and percentiles cover."""

    worker: str
    roles: list[str]
    at: float
    window_s: float
    user_id: str
    admin: bool
    throughput: list[Rate]
    latency: list[Latency]
    queues: list[QueueDepth]
    lag: list[Lag]
    breakers: list[BreakerState]
    dead_letters: list[DeadLetterCount]
    dead_letters_total: float | None
    sse_clients: float | None
    recent_failures: list[RecentFailure]


class DashboardQuota(Struct):
    """``GET /dashboard/api/quota``: an admin gets every user whose quota this worker holds, others their own."""

    scope: Literal["all", "self"]
    worker: str
    users: list[QuotaDoc]
