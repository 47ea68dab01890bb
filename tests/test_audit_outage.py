"""When the audit store cannot be written, calls are refused (503 audit_unavailable), except on a
route configured to fail open for the audit: those are served and marked (the lockgate-failed-open
header, the record's failed_open field written once the store is back, a span attribute and the
lockgate.failed_open metric). The store goes away behind a loopback TCP proxy in front of
PostgreSQL (tests/fakes/commit_cutter.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import load_settings
from gateway.store import async_url
from tests.conftest import InProcessGateway, _truncate_all, run
from tests.fakes.commit_cutter import CommitCutter

POLICY = """package lockgate

import rego.v1

decision := {"allow": true, "reasons": ["open to all"], "route": {"model": input.request.model}}
"""
MODELS = [{"name": "open", "provider": "mock", "upstream_model": "mock-fast", "free": True, "fail_open": ["audit"]},
          {"name": "closed", "provider": "mock", "upstream_model": "mock-fast", "free": True}]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def proxied(postgres_url: str, tmp_path: Path) -> Iterator[tuple[InProcessGateway, CommitCutter, InMemoryMetricReader]]:
    run(_truncate_all(postgres_url))
    port = int(postgres_url.rsplit(":", 1)[1].split("/")[0])
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "lockgate.rego").write_text(POLICY)
    with CommitCutter(port) as cutter:
        settings = load_settings(environ={
            "LOCKGATE_DATABASE_URL": postgres_url.replace(f":{port}/", f":{cutter.port}/"),
            "LOCKGATE_POLICY_DIR": str(tmp_path / "policy"), "LOCKGATE_MODELS": json.dumps(MODELS),
            "LOCKGATE_AUDIT_FLUSH_INTERVAL_S": "0.05", "LOCKGATE_AUDIT_JOURNAL_DIR": str(tmp_path / "journal"),
            # the key and the spend shown to the policy come from caches while the store is away
            "LOCKGATE_AUTH_CACHE_TTL_S": "600", "LOCKGATE_SPEND_CACHE_TTL_S": "600"})
        reader = InMemoryMetricReader()
        with TestClient(create_app(settings, (), [reader])) as client:
            yield InProcessGateway(client), cutter, reader


def chat(gateway: InProcessGateway, key: str, model: str) -> Any:
    return gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": model, "messages": HI})


def failed_open_count(reader: InMemoryMetricReader) -> dict[str, int]:
    counts: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "lockgate.failed_open":
                    for point in metric.data.data_points:
                        counts[str(point.attributes["lockgate.route"])] = point.value
    return counts


async def records(url: str) -> dict[str, dict[str, Any]]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text(
                "SELECT id, status_code, outcome, error_type, failed_open, routed_model FROM decision_records"))).all()
    finally:
        await engine.dispose()
    return {r.id: dict(r._mapping) for r in rows}


def test_while_the_audit_cannot_be_written_calls_fail_closed_unless_their_route_fails_open(
        proxied: tuple[InProcessGateway, CommitCutter, InMemoryMetricReader], postgres_url: str) -> None:
    gateway, cutter, reader = proxied
    key = gateway.create_key()
    served = [chat(gateway, key, "open"), chat(gateway, key, "closed")]  # warms the key and spend caches
    assert [r.status_code for r in served] == [200, 200]
    assert all("lockgate-failed-open" not in r.headers for r in served)

    cutter.outage()
    refused = []
    deadline = time.monotonic() + 20
    while not refused or refused[-1].status_code != 503:  # once the writer has found the store away
        assert time.monotonic() < deadline, [r.status_code for r in refused]
        refused.append(chat(gateway, key, "closed"))
        time.sleep(0.05)
    error = refused[-1].json()["error"]
    assert error["code"] == "audit_unavailable" and error["type"] == "server_error"
    assert "audit store cannot be written" in error["message"]

    opened = [chat(gateway, key, "open") for _ in range(3)]
    assert [r.status_code for r in opened] == [200, 200, 200]
    assert all(r.headers["lockgate-failed-open"] == "audit" for r in opened)
    assert all(r.json()["choices"][0]["message"]["content"] for r in opened)
    assert failed_open_count(reader) == {"open": 3}
    refused.append(chat(gateway, key, "closed"))
    assert refused[-1].status_code == 503

    cutter.restore()
    deadline = time.monotonic() + 20
    while (after := chat(gateway, key, "closed")).status_code != 200:
        assert time.monotonic() < deadline, after.text
        time.sleep(0.1)
    gateway.call(gateway.runtime.audit.flush)

    stored = run(records(postgres_url))
    every = [*served, *refused, *opened, after]
    ids = [r.headers["lockgate-decision-id"] for r in every]
    assert set(ids) <= set(stored), "every call has its record once the store is back"
    for response in opened:
        record = stored[response.headers["lockgate-decision-id"]]
        assert (record["failed_open"], record["status_code"], record["routed_model"]) == ("audit", 200, "open")
    for response in refused:
        record = stored[response.headers["lockgate-decision-id"]]
        if response.status_code == 503:  # refused before any provider was called
            assert (record["error_type"], record["routed_model"], record["failed_open"]) == \
                ("audit_unavailable", None, None)
    assert all(stored[r.headers["lockgate-decision-id"]]["failed_open"] is None for r in [*served, after])
