"""The tracer provider, and the exporter that turns finished spans into audit rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

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


class AuditSpanExporter(SpanExporter):
    """Writes spans into the audit store through the AuditWriter."""

    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._writer.add_spans([span_row(span) for span in spans])
        return SpanExportResult.SUCCESS


def build_tracer_provider(writer: AuditWriter, flush_interval_s: float,
                          extra_processors: Sequence[SpanProcessor] = ()) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "lockgate"}))
    provider.add_span_processor(BatchSpanProcessor(
        AuditSpanExporter(writer), schedule_delay_millis=max(1.0, flush_interval_s * 1000),
        max_export_batch_size=512, max_queue_size=65536,
    ))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider
