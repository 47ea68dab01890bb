"""Traces: one per call, a GenAI-convention root span with the policy and upstream spans under it.

Spans are captured with the SDK's in-memory exporter beside the audit exporter, and compared
as whole trees (volatile values such as ids and durations left out).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from gateway.settings import load_settings
from tests.conftest import in_process


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[TestClient, InMemorySpanExporter, str]]:
    exporter = InMemorySpanExporter()
    settings = load_settings(environ={"LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with in_process(settings, [SimpleSpanProcessor(exporter)]) as gateway:
        yield gateway.client, exporter, gateway.create_key()


def tree(spans: tuple[ReadableSpan, ...]) -> dict[str, Any]:
    """The spans of one trace as nested dicts: name, kind, status, attributes, children."""
    assert len({s.context.trace_id for s in spans}) == 1, "one call must make exactly one trace"
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        by_parent.setdefault(span.parent.span_id if span.parent else None, []).append(span)

    def node(span: ReadableSpan) -> dict[str, Any]:
        attributes = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()}
        if "lockgate.decision_id" in attributes:
            attributes["lockgate.decision_id"] = "<id>"
        if str(attributes.get("lockgate.policy.revision", "")).startswith("sha256:"):
            attributes["lockgate.policy.revision"] = "<revision>"  # a content hash of the policy
        return {"name": span.name, "kind": span.kind.name, "status": span.status.status_code.name,
                "attributes": attributes,
                "children": [node(c) for c in sorted(by_parent.get(span.context.span_id, []), key=lambda s: s.name)]}

    [root] = by_parent[None]
    return node(root)


def response_cost(usage: dict[str, int]) -> int:
    """What the catalog charges for mock-fast's usage (micro-dollars)."""
    [model] = [m for m in load_settings(environ={}).models if m.name == "mock-fast"]
    return model.cost_micro_usd(usage["prompt_tokens"], usage["completion_tokens"])


def test_allowed_call_span_tree(traced: tuple[TestClient, InMemorySpanExporter, str]) -> None:
    client, exporter, key = traced
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "fast", "messages": [{"role": "user", "content": "hi there"}]})
    assert response.status_code == 200
    usage = response.json()["usage"]
    spans = exporter.get_finished_spans()

    assert tree(spans) == {
        "name": "chat fast", "kind": "SERVER", "status": "UNSET",
        "attributes": {
            "gen_ai.operation.name": "chat", "lockgate.decision_id": "<id>", "lockgate.endpoint": "chat.completions",
                "gen_ai.request.model": "fast",
            "lockgate.decision.allow": True, "lockgate.policy.revision": "<revision>",
            "gen_ai.provider.name": "mock", "gen_ai.response.model": "mock-fast",
            "gen_ai.usage.input_tokens": usage["prompt_tokens"],
            "gen_ai.usage.output_tokens": usage["completion_tokens"],
            "gen_ai.response.finish_reasons": ["stop"], "http.response.status_code": 200,
            "lockgate.budget.scopes": ["team:research"],
            "lockgate.cost_micro_usd": response_cost(usage),
        },
        "children": [
            {"name": "chat mock-fast", "kind": "CLIENT", "status": "UNSET", "attributes": {
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "mock", "gen_ai.request.model": "mock-fast",
                "lockgate.catalog_model": "mock-fast", "gen_ai.response.model": "mock-fast",
                "gen_ai.usage.input_tokens": usage["prompt_tokens"],
                "gen_ai.usage.output_tokens": usage["completion_tokens"],
                "gen_ai.response.finish_reasons": ["stop"]}, "children": []},
            {"name": "policy.decide", "kind": "INTERNAL", "status": "UNSET", "attributes": {
                "lockgate.policy.entrypoint": "data.lockgate.decision", "lockgate.decision.allow": True,
                "lockgate.policy.revision": "<revision>",
                "lockgate.decision.reasons": ["team research may use mock-fast"],
                "lockgate.policy.reused": False}, "children": []},
        ],
    }
    root = next(s for s in spans if s.parent is None)
    assert response.headers["lockgate-trace-id"] == format(root.context.trace_id, "032x")


def test_a_reused_decision_says_so_on_its_policy_span(traced: tuple[TestClient, InMemorySpanExporter, str]) -> None:
    client, exporter, key = traced
    for content in ("first", "second, longer: the policy does not read the messages"):
        response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": "fast", "messages": [{"role": "user", "content": content}]})
        assert response.status_code == 200
    policy_spans = [s for s in exporter.get_finished_spans() if s.name == "policy.decide"]
    assert [(s.attributes or {}).get("lockgate.policy.reused") for s in policy_spans] == [False, True]
    assert policy_spans[0].attributes["lockgate.decision.reasons"] == policy_spans[1].attributes[  # type: ignore[index]
        "lockgate.decision.reasons"]


def test_denied_call_span_tree(traced: tuple[TestClient, InMemorySpanExporter, str]) -> None:
    client, exporter, key = traced
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 403
    reason = "team research may not use model gpt-4o (allowed: mock-fast, mock-smart)"

    assert tree(exporter.get_finished_spans()) == {
        "name": "chat gpt-4o", "kind": "SERVER", "status": "ERROR",
        "attributes": {
            "gen_ai.operation.name": "chat", "lockgate.decision_id": "<id>", "lockgate.endpoint": "chat.completions",
                "gen_ai.request.model": "gpt-4o",
            "lockgate.decision.allow": False, "lockgate.policy.revision": "<revision>", "error.type": "policy_denied",
            "http.response.status_code": 403,
        },
        "children": [
            {"name": "policy.decide", "kind": "INTERNAL", "status": "UNSET", "attributes": {
                "lockgate.policy.entrypoint": "data.lockgate.decision", "lockgate.decision.allow": False,
                "lockgate.policy.revision": "<revision>", "lockgate.decision.reasons": [reason],
                "lockgate.policy.reused": False}, "children": []},
        ],
    }


def test_spans_reach_the_audit_store(traced: tuple[TestClient, InMemorySpanExporter, str]) -> None:
    client, exporter, key = traced
    response = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": "fast", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    runtime = client.app_state["runtime"]
    runtime.tracer_provider.force_flush()
    client.portal.call(runtime.audit.flush)  # type: ignore[union-attr]

    async def stored() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        from gateway.audit.reader import read_trace
        return await read_trace(runtime.engine, response.headers["lockgate-trace-id"])

    decisions, spans = client.portal.call(stored)  # type: ignore[union-attr]
    memory = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(s["name"] for s in spans) == sorted(memory)
    for row in spans:
        assert json.loads(json.dumps(row["attributes"])) == json.loads(json.dumps(
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in memory[row["name"]].attributes.items()}))
    assert decisions[0]["id"] == memory["chat fast"].attributes["lockgate.decision_id"]


def test_ids_do_not_repeat_when_someone_seeds_the_global_random(
        traced: tuple[TestClient, InMemorySpanExporter, str]) -> None:
    """Whoever seeds ``random`` (hypothesis does, per example) must not make trace or span ids repeat."""
    client, exporter, key = traced
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    trace_ids, state = [], random.getstate()
    try:
        for _ in range(2):
            random.seed(1)
            trace_ids.append(client.post("/v1/chat/completions", json=body,
                                         headers={"Authorization": f"Bearer {key}"}).headers["lockgate-trace-id"])
    finally:
        random.setstate(state)

    spans = exporter.get_finished_spans()
    assert trace_ids[0] != trace_ids[1]
    assert len({s.context.span_id for s in spans}) == len(spans) > 2
