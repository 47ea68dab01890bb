"""The OPA policy engine end to end: ``lockgate serve`` with ``policy_engine: opa``, the official
openai SDK as the client, and OPA played by tests/fakes/opa_server.py (our HTTP shim around the
real OPA Go engine, not the OPA server binary). Only the model provider is faked otherwise.

One SQLite store: the engine does not touch the store, and the store's two backends are covered
by the rest of the suite.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.source import load_policy_source
from gateway.settings import load_settings
from tests.conftest import ROOT, Gateway, shipped_policy_data, start_gateway, stop_gateway, write_policy
from tests.fakes.opa_server import OpaServer
from tests.fakes.openai_upstream import FakeOpenAI, reply
from tests.test_approvals import Desk

TOKEN = "opa-token-7f3c9a1e5b2d4c6e8a0f"  # must never show in a log or a record
PROVIDER_KEY = "sk-fake-provider-key-opa-0123456789"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
# A second module in another package, calling a function of a third: pushed in rounds until both are in.
EXTRA = {"labels": "package lockgate.labels\nimport rego.v1\nteam_label(team) := lower(team)\n",
         "audit_extra": "package lockgate.audit_extra\nimport rego.v1\n"
                        "label := data.lockgate.labels.team_label(input.principal.team)\n"}

Serve = Callable[..., Gateway]


def catalog(upstream: FakeOpenAI) -> str:
    """The shipped catalog's names, served by the fake OpenAI provider (so provider calls can be counted)."""
    return json.dumps([{"name": name, "provider": "openai", "base_url": upstream.url, "api_key_env": "FAKE_OPENAI_KEY",
                        "upstream_model": name, "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 2.0}
                       for name in ("mock-fast", "mock-smart")])


@pytest.fixture
def opa() -> Iterator[OpaServer]:
    server = OpaServer(token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI.running() as fake:
        yield fake


@pytest.fixture
def serve(tmp_path: Path, opa: OpaServer, upstream: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """A gateway deciding with OPA (push mode; the token in the variable opa_token_env names)."""
    monkeypatch.setenv("FAKE_OPENAI_KEY", PROVIDER_KEY)
    monkeypatch.setenv("LG_TEST_OPA_TOKEN", TOKEN)
    started: list[Gateway] = []

    def start(**settings: str) -> Gateway:
        values = {"policy_engine": "opa", "opa_url": opa.url, "opa_mode": "push", "opa_timeout_s": "0.5",
                  "opa_token_env": "LG_TEST_OPA_TOKEN", "models": catalog(upstream), "policy_reload_interval_s": "0",
                  **settings}
        started.append(start_gateway(f"sqlite:///{tmp_path}/lockgate.db", tmp_path, **values))
        return started[-1]

    yield start
    for gateway in started:
        stop_gateway(gateway)


def client(gateway: Gateway, team: str = "research", user: str = "ana") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=gateway.create_key(team=team, user=user), max_retries=0,
                         timeout=30)


def records(gateway: Gateway, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = gateway.decisions()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def decision_queries(opa: OpaServer) -> int:
    return sum(1 for method, path in opa.requests if (method, path) == ("POST", "/v1/data/lockgate/decision"))


def assert_token_kept_secret(gateway: Gateway) -> None:
    assert TOKEN not in gateway.log.read_text()
    assert TOKEN not in json.dumps(gateway.decisions(), default=str)


def policy_folder(tmp_path: Path, **extra: str) -> Path:
    folder = write_policy(tmp_path / "policy")
    for name, text in extra.items():
        (folder / f"{name}.rego").write_text(text)
    return folder


def test_push_mode_uploads_the_folder_and_serves_allowed_and_denied_calls(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI, tmp_path: Path) -> None:
    folder = policy_folder(tmp_path, **EXTRA)
    gateway = serve(policy_dir=str(folder))
    pushed = {path for method, path in opa.requests if method == "PUT"}
    shipped = {p.name for p in (ROOT / "policies").glob("*.rego") if not p.name.endswith("_test.rego")}
    assert pushed == {"/v1/data/lockgate", *(f"/v1/policies/lockgate/{name}"  # every module, no test
                                             for name in shipped | {"labels.rego", "audit_extra.rego"})}
    assert sorted(opa.data["lockgate"]["catalog"]) == ["mock-fast", "mock-smart"]  # the catalog, as data
    assert opa.evaluate("lockgate/audit_extra/label", {"principal": {"team": "Research"}}) == "research"
    upstream.script(reply("Hello through OPA."), reply("Again."))

    research = client(gateway)
    answer = research.chat.completions.create(model="fast", messages=MESSAGES)
    again = research.chat.completions.create(model="fast", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(gateway, team="support", user="sam").chat.completions.create(model="smart", messages=MESSAGES)
    listed = sorted(m.id for m in client(gateway, team="support", user="sam").models.list())  # another key

    assert answer.choices[0].message.content == "Hello through OPA."
    assert again.choices[0].message.content == "Again."
    assert denied.value.status_code == 403 and denied.value.code == "policy_denied"
    assert "team support may not use model mock-smart" in denied.value.message
    assert listed == ["fast", "mock-fast"]  # /v1/models asks OPA too
    assert len(upstream.requests) == 2  # the denied call reached no provider
    revision = load_policy_source(folder, load_settings(environ={"LOCKGATE_MODELS": catalog(upstream)}).models).revision
    found = records(gateway, 4)
    calls = [r for r in found if r["endpoint"] == "chat.completions"]
    assert sorted(r["outcome"] for r in calls) == ["allowed", "allowed", "denied"]
    assert {r["policy_revision"] for r in calls} == {revision}  # push mode: the folder's content hash
    # push mode reuses decisions (the input paths come from regorus's parse of the same modules):
    # the second research call asked OPA nothing
    # research, support, and the listing's four names (a listing's estimate is not a call's, and the
    # shipped approvals read estimate.output_tokens_max)
    assert decision_queries(opa) == 2 + 4
    assert set(opa.authorizations) == {f"Bearer {TOKEN}"}
    assert_token_kept_secret(gateway)


def test_approval_and_budgets_work_with_opa(serve: Serve, opa: OpaServer, upstream: FakeOpenAI,
                                            tmp_path: Path) -> None:
    data = shipped_policy_data()
    data["teams"]["support"]["monthly_budget_micro_usd"] = 1  # less than any call's worst case
    folder = write_policy(tmp_path / "policy", data)
    gateway = serve(policy_dir=str(folder), approval_hold_s="20", approval_poll_interval_s="0.1")
    desk = Desk(gateway)
    upstream.script(reply("Paid, once approved."))

    held = desk.pay()  # dan (finance) offers transfer_funds: held for an approver
    [approval] = desk.pending()
    outsider = gateway.create_key(team="research", user="rita", roles=("approver",))
    refused = desk.decide(approval["id"], "approve", outsider)  # may_approve, asked of OPA: not her team
    approved = desk.decide(approval["id"], "approve")  # carol, finance: yes
    answer = held.result(timeout=30)
    assert answer.choices[0].message.content == "Paid, once approved."
    with pytest.raises(openai.RateLimitError) as over:
        client(gateway, team="support", user="sam").chat.completions.create(model="fast", messages=MESSAGES)

    assert refused.status_code == 403 and approved.status_code == 200
    assert answer.choices[0].message.content
    assert over.value.code == "budget_exceeded"
    assert any(q == ("POST", "/v1/data/lockgate/may_approve") for q in opa.requests)
    assert_token_kept_secret(gateway)


def test_opa_timeout_http_error_and_outage_deny_with_policy_error_and_call_no_provider(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI) -> None:
    gateway = serve(policy_cache_size="0")
    sdk = client(gateway)
    upstream.script(reply("Served while OPA answers."))
    assert sdk.chat.completions.create(model="fast", messages=MESSAGES).choices[0].message.content

    failures = []
    opa.delay_s = 1.5  # past opa_timeout_s
    with pytest.raises(openai.InternalServerError) as timed_out:
        sdk.chat.completions.create(model="fast", messages=MESSAGES)
    failures.append(timed_out.value)
    opa.delay_s, opa.fail_status = 0.0, 500
    with pytest.raises(openai.InternalServerError) as http_error:
        sdk.chat.completions.create(model="fast", messages=MESSAGES)
    failures.append(http_error.value)
    assert httpx.get(gateway.base_url + "/readyz", timeout=5).status_code == 200  # OPA's health still answers
    opa.fail_status = None
    opa.stop()
    with pytest.raises(openai.InternalServerError) as down:
        sdk.chat.completions.create(model="fast", messages=MESSAGES)
    failures.append(down.value)
    ready = httpx.get(gateway.base_url + "/readyz", timeout=5)

    assert [(e.status_code, e.code) for e in failures] == [(503, "policy_error")] * 3
    assert "OPA did not answer within 0.5s" in failures[0].message
    assert "OPA answered HTTP 500" in failures[1].message
    assert "OPA could not be asked" in failures[2].message
    assert len(upstream.requests) == 1  # only the first call reached the provider
    assert (ready.status_code, ready.json()) == (503, {"status": "unavailable", "policy": "unreachable"})
    denied = [r for r in records(gateway, 4) if r["outcome"] == "denied"]
    assert [r["error_type"] for r in denied] == ["policy_error"] * 3
    assert_token_kept_secret(gateway)


def test_a_decision_of_the_wrong_shape_from_opa_denies_the_call(
        serve: Serve, upstream: FakeOpenAI, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "lockgate.rego").write_text('package lockgate\nimport rego.v1\ndecision := {"allow": "yes"}\n')
    gateway = serve(policy_dir=str(folder))

    with pytest.raises(openai.InternalServerError) as failed:
        client(gateway).chat.completions.create(model="mock-fast", messages=MESSAGES)

    assert (failed.value.status_code, failed.value.code) == (503, "policy_error")
    assert "decision.allow is missing or not a boolean" in failed.value.message
    assert upstream.requests == []
    [record] = records(gateway, 1)
    assert (record["outcome"], record["error_type"]) == ("denied", "policy_error")


def test_a_policy_opa_refuses_stops_startup(serve: Serve, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    rego = folder / "lockgate.rego"
    # The load-time guard refuses a recursive rule before anything is pushed ...
    rego.write_text('package lockgate\nimport rego.v1\ndecision := {"allow": count(loop) == 0}\n'
                    "loop contains x if { some x in loop }\n")
    with pytest.raises(RuntimeError) as refused:
        serve(policy_dir=str(folder))
    assert "recursive rules are not allowed" in str(refused.value) and TOKEN not in str(refused.value)
    # ... and what OPA's compiler refuses (a function it does not know) stops start-up too.
    rego.write_text('package lockgate\nimport rego.v1\ndecision := {"allow": nosuch.check(input)}\n')
    with pytest.raises(RuntimeError) as failed:
        serve(policy_dir=str(folder))
    message = str(failed.value)
    assert "OPA refused the policy" in message and "nosuch.check" in message
    assert TOKEN not in message


def test_bundle_mode_queries_the_bundle_opa_serves_and_records_its_revision(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI, tmp_path: Path) -> None:
    folder = policy_folder(tmp_path)
    source = load_policy_source(folder, load_settings(environ={"LOCKGATE_MODELS": catalog(upstream)}).models)
    opa.load_bundle("governance", "v7", source.modules, source.data)
    gateway = serve(opa_mode="bundle", policy_dir=str(tmp_path / "absent"), policy_reload_interval_s="0.1")
    upstream.script(reply("One."), reply("Two."), reply("Three."))
    sdk = client(gateway)

    sdk.chat.completions.create(model="fast", messages=MESSAGES)
    sdk.chat.completions.create(model="fast", messages=MESSAGES)
    opa.load_bundle("governance", "v8", source.modules, source.data)  # the team ships a new bundle
    deadline = time.monotonic() + 10
    while "governance@v8" not in gateway.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    sdk.chat.completions.create(model="fast", messages=MESSAGES)

    assert not [path for method, path in opa.requests if method in ("PUT", "DELETE")]  # nothing pushed
    assert decision_queries(opa) == 3  # never reused in bundle mode
    found = sorted(records(gateway, 3), key=lambda r: r["created_at"])
    assert [r["policy_revision"] for r in found] == ["bundle:governance@v7"] * 2 + ["bundle:governance@v8"]
    assert_token_kept_secret(gateway)


def test_the_token_is_required_and_a_wrong_one_stops_startup(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LG_TEST_OPA_TOKEN", "not-the-token")
    with pytest.raises(RuntimeError) as failed:
        serve()
    assert "OPA answered HTTP 401" in str(failed.value) and "not-the-token" not in str(failed.value)


ONE_TEAM = """package lockgate
import rego.v1
decision := {"allow": input.principal.team == data.lockgate.allowed_team,
             "reasons": [sprintf("only team %s may call", [data.lockgate.allowed_team])]}
"""


def test_push_mode_hot_reload_pushes_a_changed_folder_and_rejects_a_refused_one(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "lockgate.rego").write_text(ONE_TEAM)
    (folder / "data.json").write_text(json.dumps({"lockgate": {"allowed_team": "research"}}))
    gateway = serve(policy_dir=str(folder), policy_reload_interval_s="0.1")
    research, support = client(gateway), client(gateway, team="support", user="sam")
    upstream.script(reply("Before."), reply("After."), reply("Still."))
    first = research.chat.completions.create(model="mock-fast", messages=MESSAGES)

    (folder / "data.json").write_text(json.dumps({"lockgate": {"allowed_team": "support"}}))
    deadline = time.monotonic() + 15
    while opa.data.get("lockgate", {}).get("allowed_team") != "support" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the swap follows the push on the gateway's loop
    with pytest.raises(openai.PermissionDeniedError) as denied:
        research.chat.completions.create(model="mock-fast", messages=MESSAGES)
    second = support.chat.completions.create(model="mock-fast", messages=MESSAGES)

    # A folder the guard refuses is never pushed: OPA keeps the serving policy, and so does the gateway.
    (folder / "lockgate.rego").write_text(ONE_TEAM + "loop contains x if { some x in loop }\n"
                                          "extra := count(loop)\n")
    time.sleep(1.5)
    third = support.chat.completions.create(model="mock-fast", messages=MESSAGES)

    assert first.choices[0].message.content == "Before." and second.choices[0].message.content == "After."
    assert third.choices[0].message.content == "Still."
    assert "only team support may call" in denied.value.message
    assert all("loop" not in text for text in opa.modules.values())
    revisions = [r["policy_revision"] for r in sorted(records(gateway, 4), key=lambda r: r["created_at"])]
    assert revisions[0] != revisions[1] and len(set(revisions[1:])) == 1
    assert "was rejected" in gateway.log.read_text() and "recursive rules are not allowed" in gateway.log.read_text()
    assert_token_kept_secret(gateway)


REVIEWED = """package lockgate
import rego.v1
decision := {"allow": true}
response_decision := {"allow": false, "reasons": ["the model may not call delete_repo"]} if {
	"delete_repo" in input.response.tool_calls
}
response_decision := {"allow": true} if { not "delete_repo" in input.response.tool_calls }
"""


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_opa_reviews_the_tool_calls_of_replies(serve: Serve, opa: OpaServer, upstream: FakeOpenAI,
                                                tmp_path: Path, stream: bool) -> None:
    from tests.fakes.openai_upstream import ToolCall

    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "lockgate.rego").write_text(REVIEWED)
    gateway = serve(policy_dir=str(folder))
    upstream.script(reply(None, tool_calls=(ToolCall("search_web"),)),
                    reply(None, tool_calls=(ToolCall("delete_repo"),)))
    sdk = client(gateway)
    tools: Any = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
                  for n in ("search_web", "delete_repo")]

    def ask() -> list[str]:
        if not stream:
            answer = sdk.chat.completions.create(model="mock-fast", messages=MESSAGES, tools=tools)
            return [c.function.name for c in answer.choices[0].message.tool_calls or []]  # type: ignore[union-attr]
        names = []
        for chunk in sdk.chat.completions.create(model="mock-fast", messages=MESSAGES, tools=tools, stream=True):
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if delta.function and delta.function.name:
                    names.append(delta.function.name)
        return names

    allowed = ask()
    with pytest.raises((openai.PermissionDeniedError, openai.APIError)) as refused:
        ask()

    assert allowed == ["search_web"]
    assert "the model may not call delete_repo" in str(refused.value)
    assert sum(1 for q in opa.requests if q == ("POST", "/v1/data/lockgate/response_decision")) == 2


TWO_HALVES = {"a": "package lockgate.a\nimport rego.v1\nhalf := {version}\n",
              "b": "package lockgate.b\nimport rego.v1\nhalf := {version}\n",
              "lockgate": "package lockgate\nimport rego.v1\n"
                          'decision := {{"allow": data.lockgate.a.half == data.lockgate.b.half,\n'
                          '             "reasons": ["the two halves of the policy disagree"]}}\n'}


def test_no_call_is_decided_on_a_half_pushed_policy(serve: Serve, opa: OpaServer, upstream: FakeOpenAI,
                                                   tmp_path: Path) -> None:
    """OPA takes one module at a time: between the uploads of a.rego and b.rego it would deny
    every call. Calls made during the (slowed) push wait for it, and are all allowed."""
    import threading

    folder = tmp_path / "policy"
    folder.mkdir()

    def write(version: int) -> None:
        for name, text in TWO_HALVES.items():
            (folder / f"{name}.rego").write_text(text.format(version=version))

    write(1)
    gateway = serve(policy_dir=str(folder), policy_reload_interval_s="0.1", policy_cache_size="0")
    upstream.script(*(reply("Fine.") for _ in range(400)))
    sdk = client(gateway)
    outcomes: list[str] = []

    def keep_calling() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(outcomes) < 200:
            try:
                sdk.chat.completions.create(model="mock-fast", messages=MESSAGES)
                outcomes.append("allowed")
            except openai.APIStatusError as exc:
                outcomes.append(f"{exc.status_code} {exc.message}")
            if any(r["policy_revision"] != revisions[0] for r in gateway.decisions(limit=5)):
                return

    revisions: list[str] = []
    sdk.chat.completions.create(model="mock-fast", messages=MESSAGES)
    revisions.append(records(gateway, 1)[0]["policy_revision"])
    opa.push_delay_s = 0.4
    caller = threading.Thread(target=keep_calling)
    caller.start()
    time.sleep(0.3)
    write(2)
    caller.join(timeout=60)

    assert len(outcomes) >= 2 and set(outcomes) == {"allowed"}, outcomes
    assert opa.evaluate("lockgate/a/half", {}) == opa.evaluate("lockgate/b/half", {}) == 2
    assert any(r["policy_revision"] != revisions[0] for r in gateway.decisions())


def test_a_failed_push_that_cannot_be_undone_refuses_calls_until_a_push_succeeds(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "lockgate.rego").write_text(ONE_TEAM)
    (folder / "data.json").write_text(json.dumps({"lockgate": {"allowed_team": "research"}}))
    gateway = serve(policy_dir=str(folder), policy_reload_interval_s="0.1", policy_cache_size="0")
    research = client(gateway)
    upstream.script(reply("Before."), reply("After."))
    assert research.chat.completions.create(model="mock-fast", messages=MESSAGES).choices[0].message.content

    opa.refuse_pushes = True  # the new policy's push fails, and so does putting the old one back
    (folder / "lockgate.rego").write_text(ONE_TEAM.replace("only team", "just team"))
    deadline = time.monotonic() + 15
    while "calls are refused until a push succeeds" not in gateway.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as refused:
        research.chat.completions.create(model="mock-fast", messages=MESSAGES)

    opa.refuse_pushes = False  # the next look pushes again, though the folder did not change
    deadline = time.monotonic() + 15
    while all("just team" not in text for text in opa.modules.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    after = research.chat.completions.create(model="mock-fast", messages=MESSAGES)

    assert (refused.value.status_code, refused.value.code) == (503, "policy_error")
    assert "part of two policies" in refused.value.message
    assert after.choices[0].message.content == "After."
    assert len(upstream.requests) == 2


def test_push_mode_pushes_again_when_opa_restarted_and_forgot_the_policy(
        serve: Serve, opa: OpaServer, upstream: FakeOpenAI, tmp_path: Path) -> None:
    gateway = serve(policy_dir=str(policy_folder(tmp_path)), policy_reload_interval_s="0.1",
                    policy_cache_size="0")
    sdk = client(gateway)
    upstream.script(reply("Before."), reply("After."))
    assert sdk.chat.completions.create(model="fast", messages=MESSAGES).choices[0].message.content == "Before."

    opa.forget()  # an OPA restart: no policy, no data
    deadline = time.monotonic() + 15
    while "pushing it again" not in gateway.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + 15
    while not opa.modules and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    after = sdk.chat.completions.create(model="fast", messages=MESSAGES)

    assert after.choices[0].message.content == "After."
    assert "lockgate/lockgate.rego" in opa.modules and opa.data["lockgate"]["catalog"]
