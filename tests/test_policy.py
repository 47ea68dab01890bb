"""The policy stage: the shipped policy's own tests, the guards around regorus, and fail-closed calls."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.policy import DECISION, build_input, parse_decision
from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError
from gateway.policy.preflight import run_preflight
from gateway.policy.source import PolicySource, load_policy_source
from gateway.runtime import StartupError, build_policy
from gateway.settings import load_settings
from gateway.types import CallFacts, Principal
from tests.conftest import InProcessGateway, in_process
from tests.conftest import write_policy as shipped_policy_copy

ROOT = Path(__file__).resolve().parents[1]


def write_policy(folder: Path, rego: str, data: dict | None = None) -> Path:  # type: ignore[type-arg]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lockgate.rego").write_text(rego)
    (folder / "data.json").write_text(json.dumps(data or {}))
    return folder


def lockgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_shipped_policy_tests_pass() -> None:
    result = lockgate("policy", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ passed, 0 failed", result.stdout), result.stdout
    # Every concern of the shipped set has its unit tests.
    for concern in ("models", "routing", "budgets", "approvals", "tools", "residency"):
        assert f"PASS data.lockgate_test.{concern}.test_" in result.stdout, concern


def test_a_failing_policy_test_fails_the_run(tmp_path: Path) -> None:
    folder = shipped_policy_copy(tmp_path / "p")
    (folder / "extra_test.rego").write_text(
        "package extra_test\nimport rego.v1\nimport data.lockgate\n"
        "test_support_may_use_smart if {\n"
        "  d := lockgate.decision with input as {\"principal\": {\"team\": \"support\"}, "
        "\"request\": {\"model\": \"mock-smart\", \"tools\": []}}\n  d.allow\n}\n")
    result = lockgate("policy", "test", "--policy-dir", str(folder))
    assert result.returncode == 1
    assert "FAIL data.extra_test.test_support_may_use_smart" in result.stdout
    assert re.search(r"\b\d+ passed, 1 failed", result.stdout), result.stdout


@pytest.mark.parametrize("call", ["http.send({\"method\": \"get\", \"url\": \"http://x\"})",
                                  "net.lookup_ip_addr(\"x\")", "opa.runtime()"])
def test_policies_that_reach_the_network_are_refused(tmp_path: Path, call: str) -> None:
    folder = write_policy(tmp_path / "p", f"package lockgate\nimport rego.v1\nx := {call}\n"
                                          "decision := {\"allow\": true}\n")
    with pytest.raises(ValueError, match="is not allowed in a Lockgate policy"):
        run_preflight(load_policy_source(folder, ()))


def test_a_comment_mentioning_http_send_is_fine(tmp_path: Path) -> None:
    folder = write_policy(tmp_path / "p",
                          "package lockgate\n# never use http.send here\ndecision := {\"allow\": true}\n")
    assert load_policy_source(folder, ()).modules


def test_a_policy_that_crashes_the_engine_stops_startup(tmp_path: Path) -> None:
    # A recursive function kills a process running regorus: the guard refuses it from the syntax tree.
    folder = write_policy(tmp_path / "p", "package lockgate\nimport rego.v1\nf(x) := y if { y := f(x) }\n"
                                          "decision := {\"allow\": f(1)}\n")
    settings = load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder)})
    with pytest.raises(StartupError, match="recursive rules are not allowed"):
        build_policy(settings)


def test_serve_refuses_a_broken_policy_with_a_clear_message(tmp_path: Path) -> None:
    folder = write_policy(tmp_path / "p", "package lockgate\ndecision := {\"allow\": true\n")
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "1"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path,
                            env={"LOCKGATE_POLICY_DIR": str(folder), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert result.returncode == 2
    assert "cannot be used" in result.stderr and "Traceback" not in result.stderr


def test_a_policy_without_the_decision_rule_stops_startup(tmp_path: Path) -> None:
    folder = write_policy(tmp_path / "p", "package lockgate\nallow := true\n")
    with pytest.raises(StartupError, match=r"defines no data\.lockgate\.decision"):
        build_policy(load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder)}))


def test_engine_refuses_other_threads_instead_of_panicking() -> None:
    engine = EmbeddedEngine(PolicySource(modules={"a.rego": "package lockgate\ndecision := {\"allow\": true}\n"},
                                         data={}))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            engine.evaluate(DECISION, {})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], PolicyEngineError)
    assert engine.evaluate(DECISION, {}) == {"allow": True}


def test_money_is_given_as_float_and_integer_micro_dollars() -> None:
    facts = CallFacts(endpoint="chat.completions", model="m", stream=False, max_tokens=None, tools=(),
                      message_count=1, metadata={}, input_tokens=1, output_tokens_max=1)
    principal = Principal(key_id="k", user="u", team="t", org="o")
    policy_input = build_input(principal, facts, 1_234_567, {"team:t": {"month": 3_200_000}}, "2026-11-25T00:00:00Z")
    assert policy_input["estimate"]["cost_micro_usd_max"] == 1_234_567
    assert policy_input["estimate"]["cost_usd_max"] == pytest.approx(1.234567)
    assert policy_input["spend"]["team:t"] == {"month": 3.2, "month_micro_usd": 3_200_000}


@pytest.mark.parametrize("raw", [None, {"allow": "yes"}, {"allow": True, "reasons": "one"},
                                 {"allow": True, "budgets": [{"scope": "team:x"}]},
                                 {"allow": True, "route": {"model": 3}},
                                 {"allow": True, "limits": {"max_cost_micro_usd_per_run": 1.5}},
                                 {"allow": True, "limits": {"max_cost_micro_usd_per_run": -1}},
                                 {"allow": True, "limits": {"max_cost_micro_usd_per_run": True}},
                                 {"allow": True, "limits": {"max_cost_micro_usd_per_run": "5000000"}},
                                 {"allow": True, "limits": {"max_cost_micro_usd_per_run": 2**63}}])
def test_decisions_of_the_wrong_shape_are_engine_errors(raw: object) -> None:
    with pytest.raises(PolicyEngineError):
        parse_decision(raw)


@pytest.mark.parametrize(("limits", "cap"), [
    ({}, None),
    ({"max_cost_micro_usd_per_run": 2_500_000}, 2_500_000),
    ({"max_cost_micro_usd_per_run": 0}, 0),
    ({"max_cost_usd_per_run": 2.5}, 2_500_000),
    ({"max_cost_usd_per_run": 0.1, "max_cost_micro_usd_per_run": 300_000}, 100_000),  # both: the lower
    ({"max_cost_usd_per_run": 3, "max_cost_micro_usd_per_run": 300_000}, 300_000),
])
def test_a_run_cost_cap_is_read_in_micro_dollars_or_dollars(limits: dict[str, Any], cap: int | None) -> None:
    assert parse_decision({"allow": True, "limits": limits}).max_run_micro_usd == cap


CONFLICTING = """package lockgate
import rego.v1
# Two complete rules that disagree for team research: evaluation fails for that team only.
decision := {"allow": true} if input.principal.team == "research"
decision := {"allow": false} if input.principal.team == "research"
decision := {"allow": "sure"} if input.principal.team == "odd"
"""


@pytest.mark.parametrize("team", ["research", "odd"])
def test_a_policy_error_denies_the_call_and_is_audited(tmp_path: Path, team: str) -> None:
    folder = write_policy(tmp_path / "p", CONFLICTING)
    settings = load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder),
                                      "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with in_process(settings) as gateway:
        key = gateway.create_key(team=team)
        response = gateway.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": "mock-fast", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "policy_error"
        [record] = gateway.decisions()
    assert (record["outcome"], record["error_type"]) == ("denied", "policy_error")


def test_a_route_that_fails_open_for_the_policy_serves_the_call_marked(tmp_path: Path) -> None:
    folder = write_policy(tmp_path / "p", CONFLICTING)
    models = [{"name": "open", "provider": "mock", "upstream_model": "mock-fast", "free": True,
               "fail_open": ["policy"]},
              {"name": "closed", "provider": "mock", "upstream_model": "mock-fast", "free": True}]
    reader = InMemoryMetricReader()
    settings = load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder), "LOCKGATE_MODELS": json.dumps(models),
                                      "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with TestClient(create_app(settings, (), [reader])) as client:
        gateway = InProcessGateway(client)
        key = gateway.create_key(team="research")

        def chat(model: str) -> Any:
            return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"model": model, "messages": [{"role": "user", "content": "x"}]})

        served, refused = chat("open"), chat("closed")
        assert served.status_code == 200 and served.headers["lockgate-failed-open"] == "policy"
        assert served.json()["choices"][0]["message"]["content"]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "policy_error"
        assert "lockgate-failed-open" not in refused.headers
        records = {r["id"]: r for r in gateway.decisions()}
    record = records[served.headers["lockgate-decision-id"]]
    assert (record["outcome"], record["failed_open"], record["routed_model"]) == ("allowed", "policy", "open")
    assert "fails open" in record["reasons"][0]
    assert records[refused.headers["lockgate-decision-id"]]["failed_open"] is None
    points = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "lockgate.failed_open" for p in m.data.data_points]
    assert [(dict(p.attributes), p.value) for p in points] == [
        ({"lockgate.route": "open", "lockgate.failed_open.reason": "policy"}, 1)]


REVIEWING = """package lockgate
import rego.v1
decision := {"allow": true, "reasons": ["ok"]}
response_decision := {"allow": false, "reasons": ["the model may not call delete_repo"]} if {
    "delete_repo" in input.response.tool_calls
}
response_decision := {"allow": true} if { not "delete_repo" in input.response.tool_calls }
"""


def test_response_policy_withholds_a_reply_with_a_forbidden_tool_call(tmp_path: Path) -> None:
    folder = write_policy(tmp_path / "p", REVIEWING)
    settings = load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder),
                                      "LOCKGATE_DATABASE_URL": f"sqlite:///{tmp_path}/lockgate.db"})
    with in_process(settings) as gateway:
        headers = {"Authorization": f"Bearer {gateway.create_key(team='any')}"}

        def ask(tool: str) -> httpx.Response:
            return gateway.client.post("/v1/chat/completions", headers=headers, json={
                "model": "mock-fast", "messages": [{"role": "user", "content": "go"}],
                "tools": [{"type": "function", "function": {"name": tool, "parameters": {}}}]})

        allowed, withheld = ask("read_repo"), ask("delete_repo")
        assert allowed.status_code == 200
        assert withheld.status_code == 403
        assert "the model may not call delete_repo" in withheld.json()["error"]["message"]
        record = next(r for r in gateway.decisions() if r["status_code"] == 403)
    assert record["reasons"] == ["the model may not call delete_repo"]
    assert record["output_tokens"] > 0 and record["cost_micro_usd"] > 0  # the provider was paid all the same


def test_the_policy_revision_names_the_content_of_rules_and_data(tmp_path: Path) -> None:
    from gateway.policy.source import load_policy_source

    first = shipped_policy_copy(tmp_path / "a")
    same = shipped_policy_copy(tmp_path / "b")
    revision = load_policy_source(first, ()).revision
    assert revision.startswith("sha256:") and load_policy_source(same, ()).revision == revision
    budgets = same / "data" / "budgets.json"
    data = json.loads(budgets.read_text())
    data["lockgate"]["teams"]["support"]["monthly_budget_micro_usd"] = 21_000_000
    budgets.write_text(json.dumps(data))
    assert load_policy_source(same, ()).revision != revision
    (first / "lockgate.rego").write_text((first / "lockgate.rego").read_text() + "\n# a comment\n")
    assert load_policy_source(first, ()).revision != revision


def test_the_shipped_rules_need_only_teams_in_their_data(tmp_path: Path) -> None:
    """Every other data key of the shipped set is optional: a concern without its data restricts
    nothing, rather than leaving the decision undefined (a denial for every call)."""
    folder = shipped_policy_copy(tmp_path / "p", {"teams": {"lab": {"models": ["m"]}}})
    source = load_policy_source(folder, ())
    engine = EmbeddedEngine(PolicySource(modules=source.modules, data=source.data))
    policy_input = {"principal": {"key_id": "k", "user": "ana", "team": "lab", "org": "o"},
                    "request": {"model": "m", "tools": ["search_web"], "max_tokens": None}}
    assert engine.evaluate(DECISION, policy_input) == {
        "allow": True, "reasons": ["team lab may use m"], "route": {"model": "m", "fallbacks": []},
        "budgets": [], "limits": {}, "approval": {"required": False},
        "audit": {"labels": {"team": "lab"}, "content": "off"}}
