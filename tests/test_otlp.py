"""Spans reach any OTLP/HTTP collector (setting otlp_endpoint) as well as the audit store; a
collector that does not answer slows and fails no call. The collector here is a loopback HTTP
server that decodes OTLP's protobuf request with the opentelemetry-proto package."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import start_gateway, stop_gateway


class _Collector(BaseHTTPRequestHandler):
    spans: list[tuple[str, dict[str, Any]]] = []
    # (metric name, unit, data point attributes, count, sum) of every histogram data point exported
    points: list[tuple[str, str, dict[str, Any], int, float]] = []
    counters: list[tuple[str, dict[str, Any], int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/metrics":
            self._metrics(body)
        elif self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                        _Collector.spans.append((span.name, attributes))
        self.send_response(200 if self.path in ("/v1/traces", "/v1/metrics") else 404)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.histogram.data_points:
                        attributes = {a.key: a.value.string_value for a in point.attributes}
                        _Collector.points.append((metric.name, metric.unit, attributes, point.count, point.sum))
                    for number in metric.sum.data_points:
                        attributes = {a.key: a.value.string_value for a in number.attributes}
                        _Collector.counters.append((metric.name, attributes, number.as_int))

    def log_message(self, *args: Any) -> None:
        pass


def test_spans_reach_an_otlp_collector(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # the SDK's batch interval, in ms
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    _Collector.spans.clear()
    gateway = start_gateway(store_url, tmp_path, otlp_endpoint=f"http://127.0.0.1:{collector.server_port}")
    try:
        sdk = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        decision_id = raw.headers["lockgate-decision-id"]
        deadline = time.monotonic() + 10
        while not any(a.get("lockgate.decision_id") == decision_id for _, a in _Collector.spans):
            assert time.monotonic() < deadline, _Collector.spans
            time.sleep(0.05)
    finally:
        stop_gateway(gateway)
        collector.shutdown()
    names = {name for name, _ in _Collector.spans}
    assert {"chat fast", "chat mock-fast", "policy.decide"} <= names
    [(_, root)] = [(n, a) for n, a in _Collector.spans if a.get("lockgate.decision_id") == decision_id]
    assert root["gen_ai.operation.name"] == "chat" and root["lockgate.endpoint"] == "chat.completions"


def test_a_collector_that_does_not_answer_fails_no_call(store_url: str, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        gateway = start_gateway(store_url, tmp_path, otlp_endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}")
        try:
            # The exporter waits 5 s for the silent collector; a call that waited with it would hit
            # the client's own timeout.
            sdk = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0,
                                timeout=4)
            for i in range(20):
                sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": f"call {i}"}])
            deadline = time.monotonic() + 10
            while len(gateway.decisions()) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(gateway.decisions()) == 20  # the audit store got every call all the same
        finally:
            stop_gateway(gateway)


def test_a_callers_traceparent_is_continued_and_the_provider_call_carries_one(
        store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from tests.fakes.openai_upstream import FakeOpenAI, reply

    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-trace-0123456789")
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with FakeOpenAI.running() as upstream:
        upstream.script(reply("traced"))
        models = [{"name": "mock-fast", "provider": "openai", "base_url": upstream.url, "upstream_model": "gpt-fake",
                   "api_key_env": "FAKE_OPENAI_KEY", "input_usd_per_mtok": 1, "output_usd_per_mtok": 1}]
        gateway = start_gateway(store_url, tmp_path, models=json.dumps(models))
        try:
            sdk = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0)
            raw = sdk.chat.completions.with_raw_response.create(
                model="fast", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
            assert raw.headers["lockgate-trace-id"] == caller_trace
            _, spans = gateway.trace(caller_trace, spans=3)
        finally:
            stop_gateway(gateway)
        [sent] = upstream.requests
    version, trace_id, span_id, flags = sent.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", caller_trace, "01")
    [attempt] = [s for s in spans if s["kind"] == "CLIENT"]
    [root] = [s for s in spans if s["kind"] == "SERVER"]
    assert span_id == attempt["span_id"] and root["parent_span_id"] == caller_span


def test_genai_metrics_reach_an_otlp_collector(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")  # the SDK's export interval, in ms
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    _Collector.points.clear()
    gateway = start_gateway(store_url, tmp_path, otlp_endpoint=f"http://127.0.0.1:{collector.server_port}")
    try:
        sdk = openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team="research"), max_retries=0)
        first = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        second = sdk.chat.completions.create(model="fast", messages=[{"role": "user", "content": "tell me more"}])
        with pytest.raises(openai.PermissionDeniedError):  # denied: it reached no provider, so no GenAI metric
            sdk.chat.completions.create(model="mock-unknown", messages=[{"role": "user", "content": "hi"}])
        assert first.usage is not None and second.usage is not None
        deadline = time.monotonic() + 10
        while True:
            latest = {(name, attrs.get("gen_ai.token.type")): (count, total) for name, _, attrs, count, total
                      in _Collector.points}  # cumulative: the last export of each series
            if latest.get(("gen_ai.client.operation.duration", None), (0, 0))[0] >= 2:
                break
            assert time.monotonic() < deadline, _Collector.points
            time.sleep(0.05)
    finally:
        stop_gateway(gateway)
        collector.shutdown()
    assert latest[("gen_ai.client.token.usage", "input")] == (
        2, first.usage.prompt_tokens + second.usage.prompt_tokens)
    assert latest[("gen_ai.client.token.usage", "output")] == (
        2, first.usage.completion_tokens + second.usage.completion_tokens)
    assert latest[("gen_ai.client.operation.duration", None)][0] == 2
    units = {name: unit for name, unit, _, _, _ in _Collector.points}
    assert units == {"gen_ai.client.token.usage": "{token}", "gen_ai.client.operation.duration": "s"}
    attributes = {k: v for _, _, attrs, _, _ in _Collector.points for k, v in attrs.items() if k != "gen_ai.token.type"}
    assert attributes == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "mock",
                          "gen_ai.request.model": "fast", "gen_ai.response.model": "mock-fast"}
