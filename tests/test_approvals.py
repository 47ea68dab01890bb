"""Stage 4, hold: calls that need a human wait in the approval queue, and run once when approved."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.approvals import ApprovalQueue, request_fingerprint
from gateway.errors import ApprovalRejected, ApprovalRequired
from gateway.types import ApprovalRequirement, Principal
from tests.conftest import Gateway

APPROVAL_ID = re.compile(r"apr_[0-9a-f]{16}")
NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)
DAN = Principal(key_id="k_dan", user="dan", team="finance", org="acme")
EVE = Principal(key_id="k_eve", user="eve", team="finance", org="acme")
NEEDS_FINANCE = ApprovalRequirement(reason="tool transfer_funds needs approval", approvers=("finance",), timeout_s=900)
BODY = b'{"model": "fast", "messages": [{"role": "user", "content": "pay acme 100 EUR"}]}'


# --- the queue ----------------------------------------------------------------------------------



async def held(queue: ApprovalQueue, principal: Principal = DAN, body: bytes = BODY) -> str:
    """Hold a new call and return the id of the approval it now waits for."""
    with pytest.raises(ApprovalRequired) as caught:
        await queue.hold(principal, "mock-fast", body, NEEDS_FINANCE, None, NOW)
    match = APPROVAL_ID.search(caught.value.message)
    assert match is not None, caught.value.message
    return match.group()


async def test_a_held_call_is_stored_as_pending_with_only_a_fingerprint_of_the_body(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)

    approval_id = await held(queue)

    [approval] = await queue.list("pending")
    assert approval.id == approval_id
    assert (approval.key_id, approval.user, approval.team, approval.model) == ("k_dan", "dan", "finance", "mock-fast")
    assert approval.request_sha256 == request_fingerprint(BODY)
    assert approval.approvers == ["finance"] and approval.reason == NEEDS_FINANCE.reason
    assert approval.expires_at.replace(tzinfo=UTC) == NOW + timedelta(seconds=900)
    assert await queue.list("approved") == []


async def test_pending_denied_and_unknown_approvals_let_nothing_through(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)
    approval_id = await held(queue)

    with pytest.raises(ApprovalRequired, match="still pending"):
        await queue.hold(DAN, "mock-fast", BODY, NEEDS_FINANCE, approval_id, NOW)
    assert await queue.decide(approval_id, False, "carol", now=NOW)
    with pytest.raises(ApprovalRejected):
        await queue.hold(DAN, "mock-fast", BODY, NEEDS_FINANCE, approval_id, NOW)
    with pytest.raises(ApprovalRejected):
        await queue.hold(DAN, "mock-fast", BODY, NEEDS_FINANCE, "apr_0000000000000000", NOW)

    assert not await queue.decide(approval_id, True, "carol", now=NOW)  # decided once, for good
    [approval] = await queue.list("denied")
    assert approval.decided_by == "carol" and approval.decided_at is not None


async def test_an_approval_is_bound_to_its_key_its_body_and_its_expiry(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)
    approval_id = await held(queue)
    assert await queue.decide(approval_id, True, "carol", now=NOW)

    for principal, body, now in [(EVE, BODY, NOW), (DAN, BODY + b" ", NOW),
                                 (DAN, BODY, NOW + timedelta(seconds=901))]:
        with pytest.raises(ApprovalRejected):
            await queue.hold(principal, "mock-fast", body, NEEDS_FINANCE, approval_id, now)

    # None of the mismatched attempts used the approval up.
    assert [a.id for a in await queue.list("approved")] == [approval_id]
    assert await queue.hold(DAN, "mock-fast", BODY, NEEDS_FINANCE, approval_id, NOW) == approval_id
    assert [a.id for a in await queue.list("used")] == [approval_id]


async def test_exactly_one_of_many_concurrent_uses_of_an_approval_succeeds(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)
    approval_id = await held(queue)
    assert await queue.decide(approval_id, True, "carol", now=NOW)

    results = await asyncio.gather(
        *(queue.hold(DAN, "mock-fast", BODY, NEEDS_FINANCE, approval_id, NOW) for _ in range(20)),
        return_exceptions=True)

    assert [r for r in results if not isinstance(r, BaseException)] == [approval_id]
    assert all(isinstance(r, ApprovalRejected) for r in results if isinstance(r, BaseException)), results
    assert [a.id for a in await queue.list("used")] == [approval_id]


async def test_exactly_one_of_many_concurrent_decisions_is_applied(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)
    approval_id = await held(queue)

    applied = await asyncio.gather(
        *(queue.decide(approval_id, i % 2 == 0, f"approver-{i}", now=NOW) for i in range(10)))

    assert applied.count(True) == 1
    [approval] = [a for a in await queue.list() if a.id == approval_id]
    winner = applied.index(True)
    assert approval.decided_by == f"approver-{winner}"
    assert approval.status == ("approved" if winner % 2 == 0 else "denied")


# --- end to end ---------------------------------------------------------------------------------

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "transfer_funds", "description": "Move money between accounts", "parameters": {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]


def client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0)


def pay(sdk: openai.OpenAI, approval_id: str | None = None, content: str = "pay acme 100 EUR") -> Any:
    headers = {"Lockgate-Approval": approval_id} if approval_id else None
    return sdk.chat.completions.create(model="fast", tools=TOOLS, messages=[{"role": "user", "content": content}],
                                       extra_headers=headers)


def refusal(sdk: openai.OpenAI, approval_id: str | None = None, content: str = "pay acme 100 EUR") -> str:
    """The error code of a call that must be refused with 403."""
    with pytest.raises(openai.PermissionDeniedError) as caught:
        pay(sdk, approval_id, content)
    assert caught.value.status_code == 403
    return str(caught.value.body["code"])  # type: ignore[index]


def approvals(gateway: Gateway, status: str = "pending") -> dict[str, str]:
    """``lockgate approvals list``: approval id -> its whole table line."""
    result = gateway.cli("approvals", "list", "--status", status)
    assert result.returncode == 0, result.stderr
    return {match.group(): line for line in result.stdout.splitlines() if (match := APPROVAL_ID.match(line))}


def test_a_held_call_runs_exactly_once_after_approval(gateway: Gateway) -> None:
    dan = client(gateway, gateway.create_key(team="finance", user="dan"))
    eve = client(gateway, gateway.create_key(team="finance", user="eve"))

    with pytest.raises(openai.PermissionDeniedError) as caught:
        pay(dan)
    error = caught.value
    assert error.status_code == 403 and error.body["code"] == "approval_required"  # type: ignore[index]
    assert "finance" in error.message and "Lockgate-Approval" in error.message
    match = APPROVAL_ID.search(error.message)
    assert match is not None, error.message
    approval_id = match.group()
    [record], _ = gateway.trace(error.response.headers["lockgate-trace-id"])
    assert (record["outcome"], record["status_code"], record["error_type"]) == ("denied", 403, "approval_required")
    assert record["cost_micro_usd"] == 0 and record["routed_model"] is None

    pending = approvals(gateway)
    assert list(pending) == [approval_id]
    assert "pending" in pending[approval_id].split() and "dan" in pending[approval_id].split()
    assert refusal(dan, approval_id) == "approval_required"  # not approved yet

    approved = gateway.cli("approvals", "approve", approval_id, "--by", "carol")
    assert approved.returncode == 0, approved.stderr
    assert approvals(gateway) == {} and list(approvals(gateway, "approved")) == [approval_id]

    # Another body or another key cannot use the approval, and does not use it up.
    assert refusal(dan, approval_id, content="pay acme 100000 EUR") == "approval_denied"
    assert refusal(eve, approval_id) == "approval_denied"
    assert refusal(eve) == "approval_required"  # eve's own identical call is held on its own

    raw = dan.chat.completions.with_raw_response.create(
        model="fast", tools=TOOLS, messages=[{"role": "user", "content": "pay acme 100 EUR"}],
        extra_headers={"Lockgate-Approval": approval_id})
    assert raw.status_code == 200
    tool_calls = raw.parse().choices[0].message.tool_calls or []
    assert [call.function.name for call in tool_calls] == ["transfer_funds"]  # type: ignore[union-attr]
    [record], _ = gateway.trace(raw.headers["lockgate-trace-id"])
    assert (record["outcome"], record["routed_model"]) == ("allowed", "mock-fast") and record["cost_micro_usd"] > 0
    assert refusal(dan, approval_id) == "approval_denied"  # used once, for good
    assert list(approvals(gateway, "used")) == [approval_id]
    assert gateway.cli("approvals", "approve", approval_id, "--by", "carol").returncode == 1
    outcomes = [(d["outcome"], d["error_type"]) for d in gateway.decisions()]
    assert outcomes.count(("allowed", None)) == 1


def test_a_denied_approval_refuses_the_call(gateway: Gateway) -> None:
    dan = client(gateway, gateway.create_key(team="finance", user="dan"))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        pay(dan)
    match = APPROVAL_ID.search(caught.value.message)
    assert match is not None
    approval_id = match.group()

    denied = gateway.cli("approvals", "deny", approval_id, "--by", "carol")
    assert denied.returncode == 0, denied.stderr

    assert refusal(dan, approval_id) == "approval_denied"
    assert refusal(dan, "apr_0000000000000000") == "approval_denied"  # no such approval
    assert list(approvals(gateway, "denied")) == [approval_id]
    second = gateway.cli("approvals", "approve", approval_id, "--by", "carol")
    assert second.returncode == 1 and "not a pending approval" in second.stderr
    assert gateway.cli("approvals", "deny", approval_id, "--by", "carol").returncode == 1


def test_calls_without_a_held_tool_need_no_approval(gateway: Gateway) -> None:
    dan = client(gateway, gateway.create_key(team="finance", user="dan"))

    reply = dan.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}],
                                        extra_headers={"Lockgate-Approval": "apr_0000000000000000"})

    assert reply.choices[0].message.content == "Mock reply from mock-fast: hello"
    assert approvals(gateway, "all") == {}


async def test_an_expired_approval_can_no_longer_be_decided(engine: AsyncEngine) -> None:
    queue = ApprovalQueue(engine)
    approval_id = await held(queue)
    assert not await queue.decide(approval_id, True, "carol", now=NOW + timedelta(seconds=901))
    assert await queue.decide(approval_id, True, "carol", now=NOW + timedelta(seconds=899))
