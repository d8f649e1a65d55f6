"""Prometheus metrics of the ML workers (default registry, ``inferstream_`` prefix)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MODEL_CALLS = Counter(
    "inferstream_model_calls_total",
    "Model calls by route (task, model), backend and outcome (ok, retryable, fatal, cancelled).",
    ["task", "model", "backend", "outcome"],
)
MODEL_CALL_SECONDS = Histogram(
    "inferstream_model_call_seconds", "Latency of model calls that got an answer.", ["task", "model", "backend"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "inferstream_model_batch_texts", "Texts per embeddings call.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
RETRIES = Counter("inferstream_model_retries_total", "Model call attempts that will be retried.", ["task"])
BREAKER_STATE = Gauge(
    "inferstream_model_breaker_state", "Circuit breaker per backend of a route: 0 closed, 1 half-open, 2 open.",
    ["task", "model", "backend"],
)
TERMINAL = Counter("inferstream_ml_terminal_total", "Terminal statuses the ML workers published.", ["task", "status"])
IN_FLIGHT = Gauge("inferstream_ml_in_flight", "Messages an ML worker holds unacked.", ["task"])
RESULT_BATCH = Histogram(
    "inferstream_ml_result_batch_events", "Result events per results message an ML worker published.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
ACKS = Counter("inferstream_ml_acks_total", "Work messages the ML workers acked.")
ACK_FRAMES = Counter(
    "inferstream_ml_ack_frames_total", "basic.ack frames the ML workers sent (with multiple, one acks several)."
)
