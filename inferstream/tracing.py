"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables ask for it; W3C context across the log and the queues.

:func:`configure` (called once per process, when the app is built) reads the
standard variables only: ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, ``none``), ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (exported over OTLP/HTTP protobuf), and,
read by the SDK itself, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_PROPAGATORS``, ``OTEL_BSP_*``. Tracing is
on only when an exporter is named or an OTLP endpoint is set: an unset
environment costs nothing, because every hot path tests :data:`ENABLED` once
per message (or batch) and otherwise creates no span and writes no header.

Inside the pipeline the context travels as a bare W3C ``traceparent``: a Kafka
record header, an AMQP message header, and for a results message carrying
several events, the header ``traceparents`` (a list in line order). Two
context variables hand it across code that has no parameter for it:
:data:`RECORD_HEADERS` (the results bridge -> ``streams.topics.send_and_wait``)
and :data:`SINK_SPANS` (the sink agent -> ``streams.delivery``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ENABLED",
    "RECORD_HEADERS",
    "SINK_SPANS",
    "Span",
    "SpanKind",
    "configure",
    "context_of",
    "context_with",
    "current",
    "current_span",
    "end_all",
    "failed",
    "header_context",
    "http_context",
    "kafka_headers",
    "line_contexts",
    "start",
    "traceparent",
    "tracer",
    "use",
    "wanted",
]

log = logging.getLogger(__name__)

#: True once :func:`configure` installed a tracer provider; read on every hot path, so a plain module global.
ENABLED = False
HEADER = "traceparent"
LIST_HEADER = "traceparents"
EXPORTERS = frozenset({"otlp", "otlp_proto_http", "console"})
INSTRUMENTATION = "inferstream"
_TRUE = frozenset({"true", "1", "yes", "on"})

# Per-record Kafka headers for the next ``send_and_wait`` of this task (the results bridge sets them).
RECORD_HEADERS: ContextVar[Sequence[Mapping[str, bytes] | None] | None] = ContextVar(
    "inferstream_record_headers", default=None
)
# request_id -> the sink span of its row in the batch being written (read by the notification step).
SINK_SPANS: ContextVar[Mapping[str, Span] | None] = ContextVar("inferstream_sink_spans", default=None)

_W3C = TraceContextTextMapPropagator()
_tracer: Tracer = trace.NoOpTracer()


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables in ``environ`` ask for traces (off when nothing is said)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    named = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if named:
        return any(e in EXPORTERS for e in named)
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def configure(default_service: str = "inferstream", environ: Mapping[str, str] | None = None) -> bool:
    """Install the SDK's tracer provider when the ``OTEL_*`` variables ask for it; returns :data:`ENABLED`.

    Idempotent: the first call that enables tracing wins (the SDK allows one global provider).
    """
    global ENABLED, _tracer
    env = os.environ if environ is None else environ  # the standard OTEL_* names, not inferstream settings
    if ENABLED or not wanted(env):
        return ENABLED
    # Imported here: a worker with tracing off never loads the SDK or the exporter.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create({"process.pid": os.getpid()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    for name in dict.fromkeys(named or ["otlp"]):
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name in ("otlp", "otlp_proto_http"):
            if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")) == "grpc":
                log.warning("OTLP over gRPC is not installed: exporting traces over OTLP/HTTP (protobuf)")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
        else:
            log.warning("OTEL_TRACES_EXPORTER %r is not supported here; ignored", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer(INSTRUMENTATION)
    ENABLED = True
    log.info("tracing on: service %s", resource.attributes.get(SERVICE_NAME))
    return True


def tracer() -> Tracer:
    return _tracer


def start(
    name: str,
    parent: Context | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time: float | None = None,
) -> Span:
    """A span under ``parent`` (the current context when None); ``start_time`` in epoch seconds."""
    ns = None if start_time is None else int(start_time * 1e9)
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes, start_time=ns)


def use(span: Span) -> AbstractContextManager[Span]:
    """``span`` as the current span for the block, ended on exit (an exception is recorded on it)."""
    return trace.use_span(span, end_on_exit=True)


def failed(span: Span, description: str) -> None:
    span.set_status(trace.StatusCode.ERROR, description)


def end_all(spans: Iterable[Span], error: BaseException | None = None) -> None:
    for span in spans:
        if error is not None:
            span.record_exception(error)
            failed(span, type(error).__name__)
        span.end()


def traceparent(span: Span) -> str:
    """The W3C ``traceparent`` of ``span`` (formatted directly: the propagator API wants a carrier per call)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def kafka_headers(span: Span) -> dict[str, bytes]:
    return {HEADER: traceparent(span).encode()}


def context_of(value: str | bytes | bytearray | None) -> Context | None:
    """The context a ``traceparent`` value names, or None when it is missing or malformed."""
    if value is None:
        return None
    text = value.decode(errors="replace") if isinstance(value, bytes | bytearray) else str(value)
    ctx = _W3C.extract({HEADER: text})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def header_context(headers: Mapping[str, Any] | None) -> Context | None:
    """The context of a Kafka record's or an AMQP message's ``traceparent`` header."""
    return None if not headers else context_of(headers.get(HEADER))


def line_contexts(headers: Mapping[str, Any] | None, count: int) -> list[Context | None]:
    """One context per event of a results message: ``traceparents`` (line order) or the single ``traceparent``."""
    headers = headers or {}
    listed = headers.get(LIST_HEADER)
    if isinstance(listed, list | tuple) and len(listed) == count:
        return [context_of(v) if v else None for v in listed]
    if count == 1:
        return [header_context(headers)]
    return [None] * count


def http_context(headers: Mapping[str, str]) -> Context:
    """The caller's context from HTTP headers, with the configured propagators (``OTEL_PROPAGATORS``)."""
    return propagate.extract(headers)


def context_with(span: Span) -> Context:
    """A context whose current span is ``span`` (to start a child of a span that is not current)."""
    return trace.set_span_in_context(span)


def current() -> Context:
    return otel_context.get_current()


def current_span() -> Span:
    return trace.get_current_span()
