"""Exactly one terminal record for every governed call, whatever its outcome: bad key, bad request,
denied, policy error, held, approved, budget refused, rate refused, provider error, client gone,
served. (A call served while the audit could not be written, on a route that fails open, is in
tests/test_audit_outage.py.) One gateway process, its records read from the store it wrote."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.store import async_url
from tests.conftest import Gateway, run, start_gateway, stop_gateway
from tests.fakes.openai_upstream import FakeOpenAI, error, reply, trickle

POLICY = """package lockgate

import rego.v1

case := object.get(input.request.metadata, "case", "")

decision := {"allow": false, "reasons": ["the case says deny"]} if case == "deny"

decision := {"allow": "yes"} if case == "policy_error"  # the wrong shape: the engine's answer is refused

decision := {
	"allow": true, "reasons": ["ok"], "route": {"model": input.request.model},
	"budgets": budgets, "limits": limits, "approval": approval,
} if not case in {"deny", "policy_error"}

budgets := [{"scope": "case:budget", "window": "month", "limit_usd": 0}] if case == "budget"
else := []

limits := {"requests_per_minute": {"key": 1}} if case == "rate"
else := {}

approval := {"required": true, "reason": "the case needs a human", "approvers": ["research"]} if case == "approve"
else := {"required": false}

may_approve if input.decider.team in input.approval.approvers
"""


@pytest.fixture
def served(store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Gateway, FakeOpenAI]]:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-outcomes-0123456789abcdef")
    with FakeOpenAI.running() as upstream:
        (tmp_path / "policy").mkdir()
        (tmp_path / "policy" / "lockgate.rego").write_text(POLICY)
        models = [{"name": "fake", "provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
                   "upstream_model": "gpt-fake", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}]
        gateway = start_gateway(store_url, tmp_path, policy_dir=str(tmp_path / "policy"), models=json.dumps(models),
                                upstream_retries="0")
        try:
            yield gateway, upstream
        finally:
            stop_gateway(gateway)


async def stored(url: str) -> dict[str, dict[str, Any]]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text(
                "SELECT id, outcome, status_code, error_type, approval_id, approved_by, routed_model "
                "FROM decision_records"))).all()
    finally:
        await engine.dispose()
    return {r.id: dict(r._mapping) for r in rows}


def test_every_outcome_leaves_exactly_one_record(served: tuple[Gateway, FakeOpenAI]) -> None:
    gateway, upstream = served
    requester = gateway.create_key(user="dan", team="research")
    approver = gateway.create_key(user="carol", team="research", roles=("approver",))
    http = httpx.Client(base_url=gateway.base_url, timeout=30)

    def chat(case: str | None, key: str = requester, **extra: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **extra}
        if case:
            body["metadata"] = {"case": case}
        return http.post("/v1/chat/completions", json=body, headers=headers)

    upstream.script(reply("served"), reply("the first in a minute"), error(500, "provider broke"),
                    reply("approved and served"))
    made: dict[str, httpx.Response] = {}  # what each call was answered, by its decision id
    expected: dict[str, tuple[str, int, str | None]] = {}  # outcome, status, error type

    def expect(response: httpx.Response, outcome: str, status: int, error_type: str | None) -> None:
        assert response.status_code == status, response.text
        made[response.headers["lockgate-decision-id"]] = response
        expected[response.headers["lockgate-decision-id"]] = (outcome, status, error_type)

    expect(chat(None), "allowed", 200, None)
    expect(chat(None, key="lg-not-a-key"), "denied", 401, "invalid_api_key")
    expect(http.post("/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {requester}"}),
           "failed", 400, "InvalidRequest")
    expect(chat("deny"), "denied", 403, "policy_denied")
    expect(chat("policy_error"), "denied", 503, "policy_error")  # fail closed: a deny
    expect(chat("budget"), "denied", 429, "budget_exceeded")
    rate_key = gateway.create_key(user="erin", team="research")
    chat("rate", key=rate_key, headers={"x-test": "first"})  # recorded below with the rest
    expect(chat("rate", key=rate_key), "denied", 429, "rate_limit_exceeded")
    expect(chat(None), "failed", 502, "upstream_unavailable")

    held = chat("approve", headers={"Lockgate-Approval-Mode": "async"})
    expect(held, "held", 202, None)
    approval_id = held.json()["id"]
    decided = http.post(f"/admin/approvals/{approval_id}/approve", json={"reason": "fine"},
                        headers={"authorization": f"Bearer {approver}"})
    expect(decided, "allowed", 200, None)
    ran = chat("approve", headers={"Lockgate-Approval": approval_id})
    expect(ran, "allowed", 200, None)

    upstream.script(trickle(interval_s=0.05, limit_s=10))
    with http.stream("POST", "/v1/chat/completions", headers={"authorization": f"Bearer {requester}"},
                     json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as gone:
        next(gone.iter_raw())  # the first event, then the client leaves
        gone_id = gone.headers["lockgate-decision-id"]
    expected[gone_id] = ("failed", 499, "client_closed")

    deadline = time.monotonic() + 15
    while not set(expected) <= set(records := run(stored(gateway.store_url))):
        assert time.monotonic() < deadline, set(expected) - set(records)
        time.sleep(0.1)
    seen = {i: (r["outcome"], r["status_code"], r["error_type"]) for i, r in records.items() if i in expected}
    assert seen == expected
    assert len(records) == len(expected) + 1  # and the first rate-limited call's record: nothing else
    assert records[ran.headers["lockgate-decision-id"]]["approval_id"] == approval_id
    assert records[ran.headers["lockgate-decision-id"]]["approved_by"] == "carol"
    assert records[held.headers["lockgate-decision-id"]]["approval_id"] == approval_id
    refused = [i for i, (outcome, _, _) in expected.items() if outcome in ("denied", "held")]
    assert all(records[i]["routed_model"] is None for i in refused)  # none of them reached the provider
