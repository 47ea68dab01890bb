"""Stage 9, record: OpenTelemetry spans and one decision record per call, in the audit store.

- ``tracing``: the tracer provider, and the span processor that hands spans to the writer as rows;
- ``writer``: the buffered writer both go through (batched inserts, off the request path);
- ``reader``: queries behind ``lockgate traces list`` and ``lockgate traces show``.
"""
