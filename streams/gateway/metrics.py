"""Prometheus metrics of the gateway (served at ``/metrics`` with every other collector)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ADMISSIONS = Counter(
    "inferstream_admissions_total", "Admission decisions by outcome", ["outcome"]
)
FORWARDED = Counter("inferstream_gateway_forwarded_total", "Requests forwarded to the owning worker")
CANCELS = Counter("inferstream_cancel_requests_total", "Accepted cancellation requests")
HTTP_LATENCY = Histogram(
    "inferstream_http_request_seconds",
    "Gateway request latency",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
SSE_CLIENTS = Gauge("inferstream_sse_clients", "Event streams (SSE) open on this worker.")
