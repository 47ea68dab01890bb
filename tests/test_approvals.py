"""Stage 4, hold: a call the policy says needs a human waits in the gateway until an authenticated
approver decides; it then runs exactly once (docs/approvals.md).

The official ``openai`` and ``anthropic`` SDKs are the waiting clients, at their default settings;
deciders use the admin HTTP API and the CLI with their own keys. Holds are kept short by settings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ROOT, Gateway, start_gateway, stop_gateway

TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "transfer_funds", "description": "Move money between accounts", "parameters": {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]
PAY = [{"role": "user", "content": "pay acme 100 EUR"}]
HOLDING = {"approval_hold_s": "20", "approval_keepalive_s": "0.3", "approval_poll_interval_s": "0.1"}


class Desk:
    """A gateway, a requester (dan, team finance) and an approver of his team (carol)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.dan_key = gateway.create_key(team="finance", user="dan")
        self.carol_key = gateway.create_key(team="finance", user="carol", roles=("approver",))
        self.pool = ThreadPoolExecutor(8)

    def sdk(self, key: str | None = None, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.v1, api_key=key or self.dan_key, **options)

    def pay(self, key: str | None = None, content: str = "pay acme 100 EUR", **options: Any) -> Future[Any]:
        """dan's call, as an application makes it, in the background (it is held)."""
        return self.pool.submit(lambda: self.sdk(key).chat.completions.create(
            model="fast", tools=TOOLS, messages=[{"role": "user", "content": content}], **options))

    def api(self, method: str, path: str, key: str | None = None, **options: Any) -> httpx.Response:
        return httpx.request(method, self.gateway.base_url + path,
                             headers={"authorization": f"Bearer {key or self.carol_key}"}, timeout=30, **options)

    def pending(self, count: int = 1, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """The pending approvals carol sees, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.api("GET", "/admin/approvals").json()["data"]
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) == count, found
                return list(found)
            time.sleep(0.05)

    def decide(self, approval_id: str, verdict: str, key: str | None = None, reason: str | None = None
               ) -> httpx.Response:
        return self.api("POST", f"/admin/approvals/{approval_id}/{verdict}", key,
                        json={"reason": reason} if reason else None)

    def approval(self, approval_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The approval as carol sees it; once its call's outcome is written if one ran it (the
        outcome is written with the call's decision record, by the audit writer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = dict(self.api("GET", f"/admin/approvals/{approval_id}").json())
            if found.get("status") != "executing" or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def records(self, approval_id: str, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The decision records of calls that asked for or ran under this approval, oldest first."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [d for d in self.gateway.decisions() if d.get("approval_id") == approval_id]
            if len(found) >= count or time.monotonic() > deadline:
                return sorted(found, key=lambda d: d["created_at"])
            time.sleep(0.05)


@pytest.fixture
def desk(store_url: str, tmp_path: Path) -> Iterator[Desk]:
    gateway = start_gateway(store_url, tmp_path, **HOLDING)
    yield Desk(gateway)
    stop_gateway(gateway)


Start = Callable[..., Desk]


@pytest.fixture
def start(store_url: str, tmp_path: Path) -> Iterator[Start]:
    """A desk on a gateway with settings of the test's own."""
    started: list[Gateway] = []

    def run(**settings: str) -> Desk:
        started.append(start_gateway(store_url, tmp_path, **{**HOLDING, **settings}))
        return Desk(started[-1])

    yield run
    for gateway in started:
        stop_gateway(gateway)


def policy_with(tmp_path: Path, **approval: Any) -> str:
    """The shipped policy, with transfer_funds's approval entry changed."""
    folder = tmp_path / "policy"
    folder.mkdir()
    shutil.copy(ROOT / "policies" / "lockgate.rego", folder / "lockgate.rego")
    data = json.loads((ROOT / "policies" / "data.json").read_text())
    data["lockgate"]["approval_tools"]["transfer_funds"].update(approval)
    (folder / "data.json").write_text(json.dumps(data))
    return str(folder)


# --- holding -----------------------------------------------------------------------------------

def test_a_held_call_gets_the_models_answer_once_approved_and_runs_once(desk: Desk) -> None:
    waiting = desk.pay()
    [approval] = desk.pending()
    assert (approval["status"], approval["requester"]["user"], approval["approvers"]) == ("pending", "dan", ["finance"])
    assert approval["summary"]["tools"] == ["transfer_funds"] and "content" not in json.dumps(approval["summary"])
    assert not waiting.done()  # held, not refused

    decided = desk.decide(approval["id"], "approve", reason="invoice 42 checked")
    assert decided.status_code == 200, decided.text

    reply = waiting.result(timeout=30)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["transfer_funds"]
    after = desk.approval(approval["id"])
    assert (after["status"], after["decided_by"], after["decision_note"]) == ("executed", "carol", "invoice 42 checked")
    [record] = desk.records(approval["id"], 1)
    assert (record["outcome"], record["approved_by"], record["id"]) == ("allowed", "carol", after["executed_by"])
    assert record["approved_at"] is not None and record["cost_micro_usd"] > 0
    # Every transition is a span in the trace of the call that asked.
    _, spans = desk.gateway.trace(approval["trace_id"], spans=4)
    names = {s["name"] for s in spans}
    assert {"lockgate.approval.requested", "lockgate.approval.approved", "lockgate.approval.executing"} <= names
    # Decided once, run once.
    assert desk.decide(approval["id"], "deny").status_code == 409
    with pytest.raises(openai.ConflictError):
        desk.sdk().chat.completions.create(model="fast", tools=TOOLS, messages=PAY,
                                           extra_headers={"Lockgate-Approval": approval["id"]})
    assert len([d for d in desk.gateway.decisions() if d["outcome"] == "allowed" and d["endpoint"] ==
                "chat.completions"]) == 1


def test_a_denied_call_raises_permission_denied_with_the_deciders_reason(desk: Desk) -> None:
    waiting = desk.pay()
    [approval] = desk.pending()
    assert desk.decide(approval["id"], "deny", reason="no invoice").status_code == 200

    with pytest.raises(openai.PermissionDeniedError) as caught:
        waiting.result(timeout=30)
    assert caught.value.body["code"] == "approval_denied"  # type: ignore[index]
    assert "denied by carol: no invoice" in caught.value.message
    [record] = desk.records(approval["id"], 1)
    assert (record["outcome"], record["status_code"], record["approved_by"]) == ("denied", 403, None)
    assert record["routed_model"] is None and record["cost_micro_usd"] == 0


def test_the_anthropic_sdk_waits_and_is_refused_alike(desk: Desk) -> None:
    client = anthropic.Anthropic(base_url=desk.gateway.base_url, api_key=desk.dan_key)
    waiting = desk.pool.submit(lambda: client.messages.create(
        model="fast", max_tokens=64, messages=[{"role": "user", "content": "pay acme"}],
        tools=[{"name": "transfer_funds", "input_schema": {"type": "object"}}]))
    [approval] = desk.pending()
    assert approval["endpoint"] == "messages"
    desk.decide(approval["id"], "deny")
    with pytest.raises(anthropic.PermissionDeniedError, match="denied by carol"):
        waiting.result(timeout=30)


def test_an_approval_nobody_decides_expires_and_a_late_decision_is_a_conflict(start: Start, tmp_path: Path) -> None:
    desk = start(policy_dir=policy_with(tmp_path, timeout_s=1))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        desk.pay().result(timeout=30)
    assert caught.value.body["code"] == "approval_expired"  # type: ignore[index]
    [approval] = desk.api("GET", "/admin/approvals?status=expired").json()["data"]
    assert desk.decide(approval["id"], "approve").status_code == 409
    assert desk.approval(approval["id"])["status"] == "expired"


def test_past_the_hold_limit_the_sdk_retries_and_its_retry_waits_on_the_same_approval(start: Start) -> None:
    desk = start(approval_hold_s="1")
    waiting = desk.pay()  # the SDK's defaults: two retries, which x-should-retry: true asks for
    [approval] = desk.pending()
    [held] = desk.records(approval["id"], 1)  # the first attempt ran out of hold
    assert (held["outcome"], held["status_code"], held["error_type"]) == ("held", 408, "approval_pending")

    assert desk.decide(approval["id"], "approve").status_code == 200
    assert waiting.result(timeout=30).choices[0].finish_reason == "tool_calls"
    assert len(desk.api("GET", "/admin/approvals?status=all").json()["data"]) == 1  # no second approval
    assert desk.records(approval["id"], 2)[-1]["outcome"] == "allowed"


def test_when_retries_run_out_the_caller_is_told_to_send_the_same_request_again(start: Start) -> None:
    desk = start(approval_hold_s="0.3")
    with pytest.raises(openai.APIStatusError) as caught:
        desk.sdk(max_retries=0).chat.completions.create(model="fast", tools=TOOLS, messages=PAY)
    error = caught.value
    assert error.status_code == 408 and error.response.headers["x-should-retry"] == "true"
    assert error.response.headers["retry-after"] == "1"
    assert "Send the same request again" in error.message


def test_async_mode_answers_202_and_runs_the_approved_request_once(desk: Desk) -> None:
    sdk = desk.sdk(max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="fast", tools=TOOLS, messages=PAY, extra_headers={"Lockgate-Approval-Mode": "async"})
    assert raw.status_code == 202
    accepted = json.loads(raw.content)
    approval_id, status_url = accepted["id"], accepted["status_url"]
    assert raw.headers["location"] == status_url == f"/v1/approvals/{approval_id}"
    assert desk.api("GET", status_url, desk.dan_key).json()["status"] == "pending"
    assert desk.api("GET", status_url, desk.carol_key).status_code == 404  # another key's approval
    assert desk.records(approval_id, 1)[0]["outcome"] == "held"

    use = {"Lockgate-Approval": approval_id}
    early = sdk.chat.completions.with_raw_response.create(  # still pending: 202 again, nothing opened
        model="fast", tools=TOOLS, messages=PAY, extra_headers={**use, "Lockgate-Approval-Mode": "async"})
    assert (early.status_code, json.loads(early.content)["id"]) == (202, approval_id)
    assert desk.decide(approval_id, "approve").status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as caught:  # another request under that id
        sdk.chat.completions.create(model="fast", tools=TOOLS, messages=[{"role": "user", "content": "pay 1M"}],
                                    extra_headers=use)
    assert caught.value.body["code"] == "approval_mismatch"  # type: ignore[index]

    reply = sdk.chat.completions.create(model="fast", tools=TOOLS, messages=PAY, extra_headers=use)
    assert reply.choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.ConflictError, match="already used"):
        sdk.chat.completions.create(model="fast", tools=TOOLS, messages=PAY, extra_headers=use)
    assert desk.approval(approval_id)["status"] == "executed"


def test_a_held_stream_receives_keepalive_comments_then_its_events(desk: Desk) -> None:
    body = {"model": "fast", "tools": TOOLS, "messages": PAY, "stream": True}
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", desk.gateway.v1 + "/chat/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {desk.dan_key}"}) as response:
            assert response.status_code == 200
            lines.extend(response.iter_lines())

    waiting = desk.pool.submit(stream)
    [approval] = desk.pending()
    time.sleep(1.0)  # a few keep-alives
    desk.decide(approval["id"], "approve")
    waiting.result(timeout=30)
    comments = [line for line in lines if line.startswith(":")]
    assert len(comments) >= 2 and comments[0] == f": waiting for approval {approval['id']}"
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and "transfer_funds" in "".join(data)
    assert lines.index(comments[-1]) < lines.index(data[0])  # comments only before the first event


def test_a_held_stream_denied_after_it_started_ends_with_an_error_event(desk: Desk) -> None:
    def stream() -> list[Any]:
        chunks = []
        with pytest.raises(openai.APIError, match="denied by carol") as caught:
            for chunk in desk.sdk().chat.completions.create(model="fast", tools=TOOLS, messages=PAY, stream=True):
                chunks.append(chunk)
        return [chunks, caught.value]

    waiting = desk.pool.submit(stream)
    [approval] = desk.pending()
    time.sleep(0.8)
    desk.decide(approval["id"], "deny")
    chunks, _ = waiting.result(timeout=30)
    assert chunks == []


# --- deciding ----------------------------------------------------------------------------------

def test_only_approvers_of_the_named_teams_in_the_same_org_and_never_the_requester_decide(desk: Desk,
                                                                                          tmp_path: Path) -> None:
    gateway = desk.gateway
    waiting = desk.pay(extra_headers={"Lockgate-Approval-Mode": "async"})
    waiting.result(timeout=30)
    [approval] = desk.pending()
    refusals = {
        "dan's own approver key": (gateway.create_key(team="finance", user="dan", roles=("approver",)),
                                   403, "self_approval"),
        "an approver of another team": (gateway.create_key(team="research", user="rob", roles=("approver",)),
                                        403, "approval_forbidden"),
        "a finance key without the role": (gateway.create_key(team="finance", user="fay"), 403,
                                           "approver_role_required"),
        "an approver of another org": (gateway.create_key(team="finance", user="olga", org="other",
                                                          roles=("approver",)), 404, "approval_not_found"),
    }
    for who, (key, status, code) in refusals.items():
        answer = desk.decide(approval["id"], "approve", key)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), who
    other_org = refusals["an approver of another org"][0]
    assert desk.api("GET", "/admin/approvals", other_org).json()["data"] == []
    assert desk.approval(approval["id"])["status"] == "pending"

    # The CLI acts as the key it is given, never as a name.
    assert gateway.cli("approvals", "approve", approval["id"]).returncode == 2
    key_file = tmp_path / "dan.key"
    key_file.write_text(refusals["dan's own approver key"][0])
    mine = gateway.cli("approvals", "approve", approval["id"], "--key-file", str(key_file))
    assert mine.returncode == 1 and "your own call" in mine.stderr
    key_file.write_text(desk.carol_key)
    listed = gateway.cli("approvals", "list", "--key-file", str(key_file))
    assert listed.returncode == 0 and approval["id"] in listed.stdout
    decided = gateway.cli("approvals", "approve", approval["id"], "--key-file", str(key_file), "--reason", "ok")
    assert decided.returncode == 0, decided.stderr
    assert (desk.approval(approval["id"])["status"], desk.approval(approval["id"])["decided_by"]) == \
        ("approved", "carol")


def test_of_concurrent_decisions_exactly_one_wins(desk: Desk) -> None:
    desk.pay(extra_headers={"Lockgate-Approval-Mode": "async"}).result(timeout=30)
    [approval] = desk.pending()
    deciders = [desk.gateway.create_key(team="finance", user=f"approver{i}", roles=("approver",)) for i in range(8)]
    barrier = threading.Barrier(len(deciders))

    def decide(index: int) -> int:
        barrier.wait()
        return desk.decide(approval["id"], "approve" if index % 2 else "deny", deciders[index]).status_code

    statuses = list(desk.pool.map(decide, range(len(deciders))))
    assert sorted(statuses) == [200] + [409] * (len(deciders) - 1)
    assert desk.approval(approval["id"])["status"] in ("approved", "denied")


def test_past_the_pending_limit_a_requester_gets_429(start: Start) -> None:
    desk = start(approval_max_pending="2")
    sdk = desk.sdk(max_retries=0)
    async_mode = {"Lockgate-Approval-Mode": "async"}
    for n in range(2):
        sdk.chat.completions.with_raw_response.create(model="fast", tools=TOOLS, extra_headers=async_mode,
                                                      messages=[{"role": "user", "content": f"pay {n}"}])
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="fast", tools=TOOLS, messages=PAY, extra_headers=async_mode)
    assert caught.value.body["code"] == "too_many_pending_approvals"  # type: ignore[index]
    # The identical request still attaches to its approval: it opens nothing.
    again = sdk.chat.completions.with_raw_response.create(model="fast", tools=TOOLS, extra_headers=async_mode,
                                                          messages=[{"role": "user", "content": "pay 0"}])
    assert again.status_code == 202


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        _Receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(500 if len(_Receiver.received) == 1 else 200)  # the first delivery fails
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_webhook_announces_a_waiting_call_signed_and_retried(start: Start) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.received.clear()
    try:
        desk = start(approval_webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                     webhook_secret="whsec-test-0123456789")  # LOCKGATE_WEBHOOK_SECRET
        desk.pay(extra_headers={"Lockgate-Approval-Mode": "async"}).result(timeout=30)
        [approval] = desk.pending()
        deadline = time.monotonic() + 10
        while len(_Receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
    assert len(_Receiver.received) == 2  # the failed delivery was retried
    headers, body = _Receiver.received[-1]
    stamp, mac = (part.split("=", 1)[1] for part in headers["lockgate-signature"].split(","))
    expected = hmac.new(b"whsec-test-0123456789", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected)
    message = json.loads(body)
    assert approval["id"] in message["text"] and "dan" in message["text"]
    assert message["approval"]["id"] == approval["id"] and "pay acme" not in body.decode()
