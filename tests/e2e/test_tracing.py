"""One request, one trace: a pipeline worker and an ML worker export OTLP/HTTP to a collector on loopback.

The collector keeps every span it is sent in memory (decoding the protobuf
``ExportTraceServiceRequest``); the test submits one request that carries a
W3C ``traceparent`` and checks that its trace covers every stage, from both
processes, with parent links that form one tree under the caller's span.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.support.pipeline import Api, Pipeline, WorkerProcess
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
PIPELINE_SERVICE = "inferstream-test-pipeline"
ML_SERVICE = "inferstream-test-ml"


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


@dataclass
class CollectedSpan:
    service: str
    pid: int
    trace_id: str
    span_id: str
    parent: str
    name: str
    attributes: dict[str, Any]


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        CollectedSpan(
                            service=str(resource.get("service.name")),
                            pid=int(resource.get("process.pid") or 0),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            name=span.name,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/traces"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def trace(self, trace_id: str) -> list[CollectedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
async def collector() -> AsyncIterator[Collector]:
    c = Collector()
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture(scope="module")
async def pipeline(broker_url: str, model_base_url: str, collector: Collector) -> AsyncIterator[Pipeline]:
    async with Pipeline.session(broker_url, model_base_url + "/v1") as p:
        # The standard variables only; the workers inherit them (Pipeline keeps non-INFERSTREAM_ variables).
        p.env.update(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector.url,
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_TRACES_SAMPLER="parentbased_always_on",
        )
        yield p


@pytest.fixture(scope="module")
async def workers(pipeline: Pipeline) -> tuple[WorkerProcess, WorkerProcess]:
    pipeline.env["OTEL_SERVICE_NAME"] = PIPELINE_SERVICE
    front = await pipeline.start_worker(wait=False, roles="pipeline")
    pipeline.env["OTEL_SERVICE_NAME"] = ML_SERVICE
    ml = await pipeline.start_worker(wait=False, roles="ml")
    await front.wait_ready(120)
    await ml.wait_ready(120)
    return front, ml


def _by_name(spans: list[CollectedSpan]) -> dict[str, list[CollectedSpan]]:
    found: dict[str, list[CollectedSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


async def test_one_request_is_one_trace_across_the_pipeline_and_the_ml_worker(
    http: aiohttp.ClientSession,
    pipeline: Pipeline,
    workers: tuple[WorkerProcess, WorkerProcess],
    collector: Collector,
) -> None:
    front, _ = workers
    api = await Api(http, front.url, await pipeline.create_key("tracer")).wait_key_active(30)
    status, accepted, _ = await api.submit(
        {"task": "generate", "input": "a traced request", "params": {"max_tokens": 8}},
        headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
    )
    assert status == 202, accepted
    rid = accepted["request_id"]
    await api.wait_status(rid, {"completed"}, timeout=60)

    requests_publish = f"{pipeline.settings.requests_topic} publish"
    stages = {
        "POST /v1/requests", "admission", "changelog write", requests_publish, "forward to work queue",
        "queue wait", "ml work", "model call", "publish result", "results bridge", "settle quota", "sink", "notify",
    }  # fmt: skip

    def complete() -> set[str] | None:
        names = {s.name for s in collector.trace(TRACE_ID)}
        # Two sink spans: the queued row (requests topic) and the terminal one (results topic).
        sinks = sum(s.name == "sink" for s in collector.trace(TRACE_ID))
        return names if stages <= names and sinks >= 2 else None

    await wait_for(complete, timeout=30, what=f"spans of every stage in trace {TRACE_ID}")
    spans = collector.trace(TRACE_ID)
    named = _by_name(spans)

    # Both processes exported into the same trace, each under its own service name and pid.
    services = {s.service for s in spans}
    assert services == {PIPELINE_SERVICE, ML_SERVICE}, services
    assert len({s.pid for s in spans}) == 2
    for name in ("ml work", "queue wait", "model call", "publish result"):
        assert {s.service for s in named[name]} == {ML_SERVICE}, name
    for name in ("POST /v1/requests", "admission", "forward to work queue", "results bridge", "settle quota", "notify"):
        assert {s.service for s in named[name]} == {PIPELINE_SERVICE}, name

    # One tree: the server span continues the caller's span; every other parent is a span of the trace.
    ids = {s.span_id for s in spans}
    assert len(ids) == len(spans)
    [server] = named["POST /v1/requests"]
    assert server.parent == CALLER_SPAN
    assert all(s.parent in ids for s in spans if s is not server), [(s.name, s.parent) for s in spans]

    def only(name: str) -> CollectedSpan:
        [span] = [s for s in named[name] if s.attributes.get("inferstream.request_id", rid) == rid]
        return span

    def parent_of(name: str) -> str:
        return next(s.name for s in spans if s.span_id == only(name).parent)

    assert parent_of("admission") == "POST /v1/requests"
    assert parent_of("changelog write") == "admission"
    assert parent_of(requests_publish) == "admission"
    assert parent_of("forward to work queue") == requests_publish
    assert parent_of("queue wait") == "forward to work queue"
    assert parent_of("ml work") == "forward to work queue"
    assert parent_of("model call") == "ml work"
    assert parent_of("publish result") == "ml work"
    assert parent_of("settle quota") == "results bridge"
    names = {s.span_id: s.name for s in spans}
    # The queued row and the terminal row (and a `running` one after a slow call): each under its sink span.
    notified = [names[s.parent] for s in named["notify"]]
    assert len(notified) >= 2 and set(notified) == {"sink"}, notified
    # A slow call also publishes `running` (under ml work): each bridged event under the span that published it.
    assert {names[s.parent] for s in named["results bridge"]} <= {"publish result", "ml work"}
    assert "publish result" in {names[s.parent] for s in named["results bridge"]}
    assert {names[s.parent] for s in named["sink"]} >= {requests_publish, "results bridge"}

    call = only("model call").attributes
    assert call["gen_ai.request.model"]
    assert call["inferstream.route"] == f"generate/{call['gen_ai.request.model']}"
    assert call["inferstream.backend"]
    assert call["inferstream.attempt"] == 1
    assert call["inferstream.batch_size"] == 1
    assert call["gen_ai.usage.input_tokens"] > 0
    assert call["gen_ai.usage.output_tokens"] > 0
