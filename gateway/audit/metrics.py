"""Metrics: the GenAI client metrics of the OpenTelemetry semantic conventions, and Lockgate's own.

- ``gen_ai.client.token.usage`` (histogram, ``{token}``): the input and the output tokens of every
  call that reached a provider, by ``gen_ai.token.type``.
- ``gen_ai.client.operation.duration`` (histogram, ``s``): from the first provider request to the
  call's end, with ``error.type`` when it failed.
- ``lockgate.failed_open`` (counter, ``{call}``): calls served although the audit store could not
  be written or the policy not evaluated, on a route configured to fail open (docs/audit.md), by
  ``lockgate.route`` and ``lockgate.failed_open.reason`` (audit or policy).

Recorded only where a reader takes them (``otlp_endpoint``: exported to ``.../v1/metrics`` every
``OTEL_METRIC_EXPORT_INTERVAL`` ms, 60 s by default); with none, nothing is measured and nothing costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

# The buckets the conventions advise for these two histograms.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


class Metrics:
    def __init__(self, readers: Sequence[MetricReader]) -> None:
        from opentelemetry.sdk.metrics import Histogram
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

        views = [View(instrument_type=Histogram, instrument_name="gen_ai.client.token.usage",
                      aggregation=ExplicitBucketHistogramAggregation(TOKEN_BUCKETS)),
                 View(instrument_type=Histogram, instrument_name="gen_ai.client.operation.duration",
                      aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS))]
        self.provider = MeterProvider(metric_readers=list(readers), views=views,
                                      resource=Resource.create({"service.name": "lockgate"}))
        meter = self.provider.get_meter("lockgate")
        self._tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                              description="Number of input and output tokens used.")
        self._duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                                description="GenAI operation duration.")
        self._failed_open = meter.create_counter(
            "lockgate.failed_open", unit="{call}",
            description="Calls served without a writable audit or a policy decision (routes that fail open).")

    def operation(self, attributes: dict[str, Any], input_tokens: int, output_tokens: int, duration_s: float,
                  error_type: str | None) -> None:
        """One call that reached a provider. ``attributes``: gen_ai.operation.name,
        gen_ai.provider.name, gen_ai.request.model, gen_ai.response.model (when known)."""
        self._tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
        self._tokens.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})
        self._duration.record(duration_s, attributes if error_type is None else {**attributes,
                                                                                  "error.type": error_type})

    def failed_open(self, route: str, reason: str) -> None:
        self._failed_open.add(1, {"lockgate.route": route, "lockgate.failed_open.reason": reason})

    def shutdown(self) -> None:
        self.provider.shutdown()


def otlp_metric_reader(endpoint: str, timeout_s: float = 5.0) -> MetricReader:
    """Metrics exported to an OTLP/HTTP (protobuf) collector (``.../v1/metrics`` added to a base
    URL), on the SDK's own thread: an unreachable collector never slows a call."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    base = endpoint.rstrip("/")
    for suffix in ("/v1/traces", "/v1/metrics"):
        base = base.removesuffix(suffix)
    return PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=base + "/v1/metrics", timeout=timeout_s))
