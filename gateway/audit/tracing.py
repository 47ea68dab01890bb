"""The tracer provider, and the span processor that turns finished spans into audit rows."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from gateway.audit.writer import AuditWriter


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def span_row(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time or 0,
        "end_ns": span.end_time or 0,
        "status": span.status.status_code.name,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "events": [{"name": e.name, "time_ns": e.timestamp,
                    "attributes": {k: _plain(v) for k, v in (e.attributes or {}).items()}}
                   for e in span.events],
    }


class AuditSpanProcessor(SpanProcessor):
    """Hands each finished span, as an audit row, to the AuditWriter.

    The writer already buffers rows and writes them off the request path, so the SDK's
    BatchSpanProcessor would only add a second queue and a worker thread that competes with the
    event loop for the GIL. Every span is kept: the audit is no sample.
    """

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self._writer.add_span(span_row(span))

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is held here; the writer's own flush writes the rows


class OwnRandomIdGenerator(IdGenerator):
    """Trace and span ids from a generator of our own, seeded once from the OS. The SDK's default
    draws on the global ``random``, and whoever seeds that (a test framework, a library) makes ids
    repeat: a repeated span id is a row the store refuses, a repeated trace id mixes two calls'
    audits. Ids name rows and are no secret, so ``random`` will do (as for decision ids)."""

    def __init__(self) -> None:
        self._random = random.Random()

    def generate_span_id(self) -> int:
        span_id = self._random.getrandbits(64)
        while span_id == trace.INVALID_SPAN_ID:
            span_id = self._random.getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = self._random.getrandbits(128)
        while trace_id == trace.INVALID_TRACE_ID:
            trace_id = self._random.getrandbits(128)
        return trace_id


def otlp_processor(endpoint: str, timeout_s: float = 5.0) -> SpanProcessor:
    """Spans exported to an OTLP/HTTP (protobuf) collector at ``endpoint`` (``.../v1/traces`` is
    added to a base URL), batched on the SDK's own thread: a slow or unreachable collector never
    slows or fails a call; the audit store gets every span regardless."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=timeout_s))


def build_tracer_provider(writer: AuditWriter, extra_processors: Sequence[SpanProcessor] = ()) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "lockgate"}), sampler=ALWAYS_ON,
                              id_generator=OwnRandomIdGenerator())
    provider.add_span_processor(AuditSpanProcessor(writer))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider
