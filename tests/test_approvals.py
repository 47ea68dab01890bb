"""Stage 4, hold: a call the policy says needs a human waits in the gateway until an authenticated
approver decides; it then runs exactly once (docs/approvals.md).

The official ``openai`` and ``anthropic`` SDKs are the waiting clients, at their default settings;
deciders use the admin HTTP API and the CLI with their own keys. Holds are kept short by settings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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

from tests.conftest import Gateway, _truncate_all, run, start_gateway, stop_gateway, write_policy
from tests.fakes.openai_upstream import FakeOpenAI, error, tool_reply

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
    folder = write_policy(tmp_path / "policy")
    rules = folder / "data" / "approvals.json"
    data = json.loads(rules.read_text())
    data["lockgate"]["approval_tools"]["transfer_funds"].update(approval)
    rules.write_text(json.dumps(data))
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
    assert record["policy_revision"].startswith("sha256:")  # the policy checked again at execution
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

    def do_POST(self) -> None:
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


# --- exactly once, durably -----------------------------------------------------------------------

def fake_catalog(upstream: FakeOpenAI) -> str:
    """The default policy's mock-fast, served by the fake OpenAI provider."""
    return json.dumps([{"name": "mock-fast", "provider": "openai", "base_url": upstream.url, "api_key_env":
                        "FAKE_OPENAI_KEY", "upstream_model": "gpt-fake", "input_usd_per_mtok": 1.0,
                        "output_usd_per_mtok": 2.0}])


def approved_async(desk: Desk, content: str = "pay acme 100 EUR") -> str:
    """An async-mode call of dan's, approved by carol: its approval id."""
    raw = desk.sdk(max_retries=0).chat.completions.with_raw_response.create(
        model="fast", tools=TOOLS, messages=[{"role": "user", "content": content}],
        extra_headers={"Lockgate-Approval-Mode": "async"})
    approval_id = str(json.loads(raw.content)["id"])
    assert desk.decide(approval_id, "approve").status_code == 200
    return approval_id


def run_approved(desk: Desk, approval_id: str, content: str = "pay acme 100 EUR") -> Any:
    return desk.sdk(max_retries=0).chat.completions.create(
        model="fast", tools=TOOLS, messages=[{"role": "user", "content": content}],
        extra_headers={"Lockgate-Approval": approval_id})


def test_a_failure_the_provider_cannot_have_billed_leaves_the_approval_usable(
        start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-approvals-0123456789")
    with FakeOpenAI.running() as upstream:
        desk = start(models=fake_catalog(upstream), upstream_retries="0")
        usable = approved_async(desk)
        upstream.script(error(503, "overloaded"), tool_reply("transfer_funds"))
        with pytest.raises(openai.InternalServerError):
            run_approved(desk, usable)  # refused before any work: nothing billed
        assert desk.approval(usable)["status"] == "approved"
        assert run_approved(desk, usable).choices[0].finish_reason == "tool_calls"
        assert desk.approval(usable)["status"] == "executed"

        spent = approved_async(desk, "pay acme 200 EUR")
        upstream.script(error(500, "failed after the work"))
        with pytest.raises(openai.InternalServerError):
            run_approved(desk, spent, "pay acme 200 EUR")  # a 500: the provider may have billed
        assert desk.approval(spent)["status"] == "failed"
        with pytest.raises(openai.ConflictError):
            run_approved(desk, spent, "pay acme 200 EUR")
        assert len(upstream.requests) == 3


def test_a_call_held_by_a_process_killed_with_sigkill_waits_again_after_restart(start: Start) -> None:
    desk = start()
    waiting = desk.pool.submit(lambda: desk.sdk(max_retries=0).chat.completions.create(
        model="fast", tools=TOOLS, messages=PAY))
    [approval] = desk.pending()
    desk.gateway.process.kill()  # SIGKILL: no shutdown, no flush
    desk.gateway.process.wait()
    with pytest.raises(openai.APIConnectionError):
        waiting.result(timeout=30)

    again = start()  # a new process on the same store
    again.carol_key, again.dan_key = desk.carol_key, desk.dan_key
    retry = again.pool.submit(lambda: again.sdk().chat.completions.create(model="fast", tools=TOOLS, messages=PAY))
    assert [a["id"] for a in again.pending()] == [approval["id"]]  # the pending approval survived
    assert again.decide(approval["id"], "approve").status_code == 200
    assert retry.result(timeout=30).choices[0].finish_reason == "tool_calls"
    assert again.approval(approval["id"])["status"] == "executed"
    assert len(again.api("GET", "/admin/approvals?status=all").json()["data"]) == 1


def test_twenty_concurrent_runs_of_one_approval_on_two_processes_make_one_provider_call(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(_truncate_all(postgres_url))
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-fake-approvals-0123456789")
    with FakeOpenAI.running() as upstream:
        upstream.script(*(tool_reply("transfer_funds") for _ in range(20)))
        settings = {**HOLDING, "models": fake_catalog(upstream)}
        first = start_gateway(postgres_url, tmp_path, **settings)
        second = start_gateway(postgres_url, tmp_path, **settings)
        try:
            desks = [Desk(first), Desk(second)]
            desks[1].dan_key, desks[1].carol_key = desks[0].dan_key, desks[0].carol_key
            approval_id = approved_async(desks[0])
            barrier = threading.Barrier(20)

            def attempt(index: int) -> str:
                barrier.wait()
                try:
                    run_approved(desks[index % 2], approval_id)
                    return "ran"
                except openai.ConflictError:
                    return "conflict"

            with ThreadPoolExecutor(20) as pool:
                results = list(pool.map(attempt, range(20)))
            assert sorted(results) == ["conflict"] * 19 + ["ran"]
            assert len(upstream.requests) == 1
            assert desks[1].approval(approval_id)["status"] == "executed"
        finally:
            stop_gateway(first)
            stop_gateway(second)


def test_a_decision_on_one_process_wakes_the_call_held_on_another_at_once(
        postgres_url: str, tmp_path: Path) -> None:
    """LISTEN/NOTIFY: with polling set to a minute, only the notification can wake the call in time."""
    run(_truncate_all(postgres_url))
    settings = {**HOLDING, "approval_poll_interval_s": "60"}
    holder = start_gateway(postgres_url, tmp_path, **settings)
    decider = start_gateway(postgres_url, tmp_path, **settings)
    try:
        held, deciding = Desk(holder), Desk(decider)
        deciding.dan_key, deciding.carol_key = held.dan_key, held.carol_key
        waiting = held.pay()
        [approval] = deciding.pending()
        assert deciding.decide(approval["id"], "approve").status_code == 200
        assert waiting.result(timeout=20).choices[0].finish_reason == "tool_calls"
    finally:
        stop_gateway(holder)
        stop_gateway(decider)


# --- tool calls in replies -----------------------------------------------------------------------

REVIEW = """package lockgate

import rego.v1

response_decision := {"allow": true, "approval": {"required": true, "approvers": ["finance"],
    "reason": "the reply calls transfer_funds"}} if {
	"transfer_funds" in input.response.tool_calls
} else := {"allow": true}
"""


@pytest.fixture
def reviewing(start: Start, tmp_path: Path) -> Desk:
    """No request needs approval; a reply that calls transfer_funds does."""
    folder = write_policy(tmp_path / "review-policy", review=REVIEW)
    rules = folder / "data" / "approvals.json"
    data = json.loads(rules.read_text())
    data["lockgate"]["approval_tools"] = {}
    rules.write_text(json.dumps(data))
    return start(policy_dir=str(folder))


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_calling_a_held_tool_is_released_only_once_approved(reviewing: Desk, stream: bool) -> None:
    desk = reviewing

    def call() -> list[str]:
        sdk = desk.sdk()
        if not stream:
            reply = sdk.chat.completions.create(model="fast", tools=TOOLS, messages=PAY)
            return [c.function.name for c in reply.choices[0].message.tool_calls or []]
        names = []
        for chunk in sdk.chat.completions.create(model="fast", tools=TOOLS, messages=PAY, stream=True):
            names += [c.function.name for c in chunk.choices[0].delta.tool_calls or [] if c.function.name] \
                if chunk.choices else []
        return names

    waiting = desk.pool.submit(call)
    [approval] = desk.pending()
    assert approval["kind"] == "reply" and approval["summary"]["reply_tool_calls"] == ["transfer_funds"]
    time.sleep(0.5)
    assert not waiting.done()  # nothing of the reply has reached the client
    assert desk.decide(approval["id"], "approve").status_code == 200
    assert waiting.result(timeout=30) == ["transfer_funds"]
    assert desk.approval(approval["id"])["status"] == "executed"
    [record] = desk.records(approval["id"], 1)
    assert (record["outcome"], record["approved_by"]) == ("allowed", "carol")


def test_a_denied_reply_is_an_error_naming_the_tool(reviewing: Desk) -> None:
    waiting = reviewing.pay()
    [approval] = reviewing.pending()
    reviewing.decide(approval["id"], "deny", reason="not today")
    with pytest.raises(openai.PermissionDeniedError, match=r"transfer_funds.*denied by carol: not today"):
        waiting.result(timeout=30)


def test_an_approved_call_not_run_within_the_use_window_expires(start: Start) -> None:
    desk = start(approval_use_s="0.5")
    approval_id = approved_async(desk)
    time.sleep(0.8)
    with pytest.raises(openai.PermissionDeniedError, match="before the approved call ran") as caught:
        run_approved(desk, approval_id)
    assert caught.value.body["code"] == "approval_expired"  # type: ignore[index]
    assert desk.approval(approval_id)["status"] == "expired"


def test_an_oversized_decision_body_is_refused_and_decides_nothing(desk: Desk) -> None:
    desk.pay(extra_headers={"Lockgate-Approval-Mode": "async"}).result(timeout=30)
    [approval] = desk.pending()
    answer = desk.api("POST", f"/admin/approvals/{approval['id']}/deny", content=b"{" + b" " * 40_000 + b"}")
    assert (answer.status_code, answer.json()["error"]["code"]) == (413, "request_too_large")
    assert desk.approval(approval["id"])["status"] == "pending"
