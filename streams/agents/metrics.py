"""Prometheus metrics of the agents (served at ``/metrics`` with every other collector)."""

from __future__ import annotations

from prometheus_client import Counter

SETTLED = Counter("inferstream_quota_settled_total", "Terminal results settled in the quota table", ["status"])
FORWARD_BATCHES = Counter("inferstream_bridge_published_total", "Requests published to RabbitMQ")
STALLS = Counter(
    "inferstream_agent_batch_failures_total", "Agent batches that failed and will be retried", ["agent"]
)
# At 0 from the start (the names ``until_done`` is given): a series that first appears at 1
# is invisible to rate() and increase(), and a dashboard panel would show "no data".
for _agent in ("forward-requests", "settle-quota", "sink-requests", "sink-results"):
    STALLS.labels(_agent)
ORPHANS_RELEASED = Counter(
    "inferstream_quota_orphans_released_total",
    "Admissions released because their request never reached the log (a crash after the charge)",
)
REDISPATCHED = Counter(
    "inferstream_watchdog_redispatched_total", "Requests found still queued long after admission and dispatched again"
)
