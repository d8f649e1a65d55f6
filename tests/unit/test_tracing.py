"""Tracing: when the OTEL_* variables turn it on, and the context carried across the log and the queues."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from bridges.clients.rabbitmq import RESULTS_BATCH_TYPE
from bridges.results_bridge import ResultsBridge
from inferstream import tracing
from inferstream.settings import Settings
from schemas.records import ResultEvent
from streams.topics import send_and_wait
from workers.results import ResultPublisher

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on for one test, with a private provider (the global one is never set in unit tests)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "ENABLED", True)
    yield exporter
    provider.shutdown()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
    ],
)
def test_tracing_is_off_unless_the_standard_variables_ask_for_it(environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environ) is on


def _configure_in_a_fresh_process(extra: dict[str, str]) -> dict[str, Any]:
    code = (
        "import json, sys\n"
        "from inferstream import tracing\n"
        "on = tracing.configure('inferstream-test')\n"
        "from opentelemetry import trace\n"
        "res = getattr(trace.get_tracer_provider(), 'resource', None)\n"
        "print(json.dumps({'on': on, 'sdk_loaded': 'opentelemetry.sdk.trace' in sys.modules,\n"
        "  'service': res.attributes.get('service.name') if res else None}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | extra
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=60)
    loaded: dict[str, Any] = orjson.loads(out.stdout.splitlines()[-1])
    return loaded


def test_configure_off_loads_no_sdk_and_on_names_the_service() -> None:
    assert _configure_in_a_fresh_process({}) == {"on": False, "sdk_loaded": False, "service": None}
    on = _configure_in_a_fresh_process({"OTEL_TRACES_EXPORTER": "console"})
    assert on == {"on": True, "sdk_loaded": True, "service": "inferstream-test"}
    named = _configure_in_a_fresh_process({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gw-1"})
    assert named["service"] == "gw-1"


def test_traceparent_round_trips_through_headers(spans: InMemorySpanExporter) -> None:
    parent = tracing.context_of(PARENT)
    assert parent is not None
    span = tracing.start("child", parent)
    header = tracing.traceparent(span)
    ctx = span.get_span_context()
    assert header == f"00-{TRACE}-{format_span_id(ctx.span_id)}-01"
    assert tracing.kafka_headers(span) == {"traceparent": header.encode()}
    again = tracing.header_context({"traceparent": header.encode()})  # Kafka header values are bytes
    assert again is not None
    span.end()
    [done] = spans.get_finished_spans()
    assert done.parent is not None and format_span_id(done.parent.span_id) == "00f067aa0ba902b7"


@pytest.mark.parametrize("value", [None, "", "garbage", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"])
def test_a_missing_or_malformed_traceparent_is_no_context(value: str | bytes | None) -> None:
    assert tracing.context_of(value) is None
    assert tracing.header_context(None) is None and tracing.header_context({}) is None


def test_each_event_of_a_results_message_gets_its_own_context() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    listed = tracing.line_contexts({"traceparents": [PARENT, "", other]}, 3)
    assert listed[1] is None
    ids = [format_trace_id(_span_ctx(c).trace_id) for c in (listed[0], listed[2])]
    assert ids == [TRACE, "1" * 32]
    assert tracing.line_contexts({"traceparents": [PARENT]}, 3) == [None, None, None]  # a list of the wrong length
    [single] = tracing.line_contexts({"traceparent": PARENT}, 1)
    assert format_trace_id(_span_ctx(single).trace_id) == TRACE


def _span_ctx(ctx: Any) -> Any:
    from opentelemetry import trace

    return trace.get_current_span(ctx).get_span_context()


class Rabbit:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Sequence[str | None] | None]] = []

    async def publish_results(self, events: Sequence[ResultEvent], traces: Sequence[str | None] | None = None) -> None:
        self.calls.append(([e.request_id for e in events], traces))


def _event(i: int) -> ResultEvent:
    return ResultEvent(request_id=f"r{i}", user_id="u", status="completed", at=1.0)


async def test_result_publisher_sends_traces_in_line_order_and_none_when_off() -> None:
    rabbit = Rabbit()
    publisher = ResultPublisher(rabbit)
    await asyncio.gather(publisher.publish(_event(0), "t0"), publisher.publish(_event(1)), publisher.publish(_event(2), "t2"))
    assert rabbit.calls == [(["r0", "r1", "r2"], ["t0", None, "t2"])]
    await asyncio.gather(*(publisher.publish(_event(i)) for i in range(2)))
    assert rabbit.calls[-1] == (["r0", "r1"], None)  # untraced: the old call, no header list
    assert publisher._traces == {}


class Topic:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, **kwargs: Any) -> asyncio.Future[None]:
        self.sent.append(kwargs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_send_and_wait_adds_no_headers_when_off() -> None:
    topic = Topic()
    token = tracing.RECORD_HEADERS.set([{"traceparent": b"x"}])
    try:
        await send_and_wait(topic, [("k", b"v")])  # type: ignore[arg-type]
    finally:
        tracing.RECORD_HEADERS.reset(token)
    assert topic.sent == [{"key": "k", "value": b"v"}]


class Message:
    def __init__(self, bodies: list[bytes], headers: dict[str, Any]) -> None:
        batch = len(bodies) > 1
        self.body = b"\n".join(bodies)
        self.content_type = RESULTS_BATCH_TYPE if batch else "application/json"
        self.headers = headers
        self.message_id = "m"


class FakeRabbit:
    results_queue_name = "ns.results"


async def test_the_results_bridge_puts_one_span_per_event_in_each_records_header(spans: InMemorySpanExporter) -> None:
    topic = Topic()

    async def produce(records: list[tuple[bytes, bytes]]) -> None:
        await send_and_wait(topic, ((k.decode(), v) for k, v in records))  # type: ignore[arg-type]

    bridge = ResultsBridge(Settings.from_env({}), FakeRabbit(), produce)  # type: ignore[arg-type]
    bodies = [orjson.dumps({"request_id": f"r{i}", "user_id": f"u{i}"}) for i in range(3)]
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    batch = [
        Message(bodies[:2], {"events": 2, "user_ids": ["u0", "u1"], "traceparents": [PARENT, other]}),
        Message(bodies[2:], {"user_id": "u2"}),  # an untraced single event: a root span
    ]
    records = await bridge._produce_traced(batch)  # type: ignore[arg-type]
    assert [k for k, _ in records] == [b"u0", b"u1", b"u2"]
    finished = {format_span_id(s.context.span_id): s for s in spans.get_finished_spans()}
    headers = [sent["headers"]["traceparent"].decode() for sent in topic.sent]
    linked: list[ReadableSpan] = [finished[h.split("-")[2]] for h in headers]
    assert [format_trace_id(s.context.trace_id) for s in linked[:2]] == [TRACE, "1" * 32]
    assert linked[2].parent is None
    assert tracing.RECORD_HEADERS.get() is None


class RowStore:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    async def upsert_events(self, items: Sequence[Any], *, report_current: bool = False) -> list[dict[str, Any]]:
        return self.rows

    async def reset(self) -> None:
        pass


def _e2e_count(task: str, model: str, status: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "inferstream_end_to_end_seconds_count", {"task": task, "model": model, "status": status}
    )
    return value or 0.0


async def test_end_to_end_is_observed_once_per_request_made_terminal() -> None:
    from datetime import UTC, datetime

    from bridges.sink import ResultSink

    now = datetime.now(UTC)
    rows = [
        {"request_id": "a", "task": "generate", "model": "e2e-m", "status": "completed", "status_rank": 4,
         "prev_rank": 1, "created_at": now},
        {"request_id": "b", "task": "generate", "model": "e2e-m", "status": "completed", "status_rank": 4,
         "prev_rank": 4, "created_at": now},  # already terminal: a replay, not counted again
        {"request_id": "c", "task": "generate", "model": "e2e-m", "status": "running", "status_rank": 3,
         "prev_rank": 1, "created_at": now},  # not terminal
    ]  # fmt: skip
    before = _e2e_count("generate", "e2e-m", "completed")
    await ResultSink(Settings(), RowStore(rows)).write([_event(0)])
    assert _e2e_count("generate", "e2e-m", "completed") == before + 1
