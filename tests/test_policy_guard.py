"""The load-time guard (gateway/policy/guard.py) and the child it runs in (gateway/policy/preflight.py).

The guard reads the syntax tree: no string, comment, line break or spelling hides a forbidden
builtin or a recursive rule from it, and a text that merely mentions one still loads. Whatever
still crashes the engine crashes a child, and costs the one input that did it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy import DECISION
from gateway.policy.preflight import evaluate_in_child, vet_policy
from gateway.policy.source import PolicySource, load_policy_source
from gateway.runtime import StartupError, build_policy
from gateway.settings import load_settings
from tests.conftest import ROOT

HEAD = "package lockgate\nimport rego.v1\n\n"  # rules start on line 4
ALLOW = '\ndecision := {"allow": true}\n'


def source(rego: str, **more: str) -> PolicySource:
    return PolicySource(modules={"p.rego": HEAD + rego + ALLOW, **more}, data={})


def errors(rego: str, **more: str) -> list[str]:
    return [str(f) for f in vet_policy(source(rego, **more)).errors]


@pytest.mark.parametrize(("rego", "where", "name"), [
    # After a '#' inside a string on the same line: the text guard took the rest for a comment.
    ('x := http.send({"method": "get", "url": "http://intra/#frag"})', "p.rego:4:6", "http.send"),
    # After a string that looks like a comment, on the line before.
    ('y := "# nothing to see"\nx := http.send({"method": "get", "url": y})', "p.rego:5:6", "http.send"),
    # Split over lines, and written as an index.
    ('x := http.send(\n\t{"method": "get",\n\t "url": "http://intra"}\n)', "p.rego:4:6", "http.send"),
    ('x := http["send"]({"method": "get", "url": "http://intra"})', "p.rego:4:6", "http.send"),
    # Inside a function, called from nowhere.
    ('fetch(u) := r if {\n    r := http.send({"method": "get", "url": u})\n}', "p.rego:5:10", "http.send"),
    # As the replacement in a with.
    ("x := t if { t := time.now_ns() with time.now_ns as http.send }", "p.rego:4:52", "http.send"),
    ('x := net.cidr_contains("10.0.0.0/8", input.request.metadata.ip)', "p.rego:4:6", "net.cidr_contains"),
    ('x := net.lookup_ip_addr("intra")', "p.rego:4:6", "net.lookup_ip_addr"),
    ("x := opa.runtime()", "p.rego:4:6", "opa.runtime"),
    # A local or a rule named like the namespace: regorus still calls the builtin.
    ("x := r if { opa := 1; r := opa.runtime() }", "p.rego:4:28", "opa.runtime"),
    ('http := 1\nx := http.send({"method": "get", "url": "http://intra"})', "p.rego:5:6", "http.send"),
])
def test_forbidden_builtins_are_refused_however_they_are_written(rego: str, where: str, name: str) -> None:
    [error] = errors(rego)

    assert error.startswith(f"{where}: error: {name}")
    assert "is not allowed in a Lockgate policy" in error


def test_a_forbidden_builtin_in_a_test_module_is_refused_too() -> None:
    test = HEAD.replace("lockgate", "lockgate_test") + 'test_x if { http.send({"url": "u", "method": "get"}) }\n'
    vetting = vet_policy(PolicySource(modules={"p.rego": HEAD + ALLOW}, data={}, tests={"p_test.rego": test}),
                         with_tests=True)
    assert [str(e).split(": error")[0] for e in vetting.errors] == ["p_test.rego:4:13"]


def test_policies_that_only_mention_http_send_load() -> None:
    rego = ('# http.send, net.lookup_ip_addr and opa.runtime are refused by the guard\n'
            'note := "we never call http.send(...) here" # nor net.cidr_contains\n'
            'send := {"http.send": true}\n'
            'http_send := 1\n')
    assert vet_policy(source(rego)).findings == []


@pytest.mark.parametrize(("rego", "where", "cycle"), [
    ("a := a + 1", "p.rego:4:1", ["data.lockgate.a references data.lockgate.a at p.rego:4:6"]),
    ("a := b\nb := c\nc := a", "p.rego:4:1",
     ["data.lockgate.a references data.lockgate.b at p.rego:4:6", "data.lockgate.b references data.lockgate.c",
      "data.lockgate.c references data.lockgate.a at p.rego:6:6"]),
    ("f(x) := g(x)\ng(x) := f(x)\nv := f(1)", "p.rego:4:1", ["data.lockgate.f references data.lockgate.g"]),
    # Reached only when a client's metadata has the key: the sample input never gets there.
    ("f(x) := f(x) if input.request.metadata.loop\nv := f(1)", "p.rego:4:1",
     ["data.lockgate.f references data.lockgate.f at p.rego:4:9"]),
    ("s contains x if { some x in s }", "p.rego:4:1", ["data.lockgate.s references data.lockgate.s"]),
    ('o[k] := 1 if { some k in object.keys(data.lockgate.o) }', "p.rego:4:1",
     ["data.lockgate.o references data.lockgate.o at p.rego:4:38"]),
    ("d := 1 if { input.x } else := e\ne := d", "p.rego:4:1", ["data.lockgate.d references data.lockgate.e"]),
    ("c := [y | some y in c2]\nc2 := {z | some z in c}", "p.rego:4:1",
     ["data.lockgate.c references data.lockgate.c2"]),
    ("t := data.lockgate", "p.rego:4:1", ["data.lockgate.t references data.lockgate.t"]),
])
def test_recursive_rules_are_refused_with_the_rules_and_places(rego: str, where: str, cycle: list[str]) -> None:
    [error] = errors(rego)

    assert error.startswith(f"{where}: error: recursive rules are not allowed")
    for step in cycle:
        assert step in error


def test_recursion_across_packages_through_an_import_is_refused() -> None:
    other = "package helpers\nimport rego.v1\nimport data.lockgate\n\nlimit := lockgate.cap\n"
    [error] = errors("import data.helpers\ncap := helpers.limit", **{"helpers.rego": other})

    assert "data.lockgate.cap references data.helpers.limit at p.rego:5:8" in error
    assert "data.helpers.limit references data.lockgate.cap at helpers.rego:5:10" in error


def test_locals_named_like_rules_are_no_recursion() -> None:
    rego = ('team := data.lockgate.teams[input.principal.team]\n'
            'names := [n | some n in input.request.tools]\n'
            'other := t if { team := "x"; t := team }\n'
            'first := x if { some x; x := team }\n'
            'copy(team) := team\n')
    assert errors(rego) == []


def test_a_recursive_rule_reached_only_through_metadata_kills_a_bare_engine_but_never_loads(tmp_path: Path) -> None:
    rego = "f(x) := f(x) if input.request.metadata.loop\n"
    decision = 'decision := {"allow": true, "r": f(1)} if input.request.metadata.loop\n'
    bare = ("import regorus\ne = regorus.Engine()\ne.add_policy('p.rego', " + repr(HEAD + rego + decision) + ")\n"
            "e.set_input({'request': {'metadata': {'loop': 'yes'}}})\ne.eval_rule('data.lockgate.decision')\n")
    crashed = subprocess.run([sys.executable, "-c", bare], capture_output=True, timeout=60)
    assert crashed.returncode < 0  # SIGSEGV: this is what a client's metadata did to the gateway

    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "lockgate.rego").write_text(HEAD + rego + decision + ALLOW.replace("decision :=", "default decision :="))
    with pytest.raises(StartupError, match=r"lockgate.rego:4:1: error: recursive rules are not allowed"):
        build_policy(load_settings(environ={"LOCKGATE_POLICY_DIR": str(folder)}))


@pytest.mark.parametrize(("rego", "refused"), [
    ("n := count(numbers.range(1, input.request.max_tokens))", "numbers.range with a bound"),
    ("n := numbers.range_step(0, input.x, 1)", "numbers.range_step with a bound"),
    ('s := sprintf(input.request.metadata.fmt, [1])', "sprintf with a format"),
    ("n := c if { numbers := 0; c := count(numbers.range(1, input.request.max_tokens)) }",
     "numbers.range with a bound"),
    ("n := count(numbers.range(1, 10))", None),
    ("n := numbers.range(-5, 5)", None),
    ('s := sprintf("%d tokens", [input.request.max_tokens])', None),
])
def test_builtins_a_client_could_make_allocate_without_bound(rego: str, refused: str | None) -> None:
    found = errors(rego)
    if refused is None:
        assert found == []
    else:
        [error] = found
        assert error.startswith("p.rego:4:") and refused in error


@pytest.mark.parametrize(("rego", "where", "suggestion"), [
    ("big if input.estimate.cost_usd_max > 0.5", "p.rego:4:8", "input.estimate.cost_micro_usd_max"),
    ('over if input.spend["team:research"].month >= 100', "p.rego:4:9", 'input.spend["team:research"].month_micro_usd'),
    ("over if { some s; input.spend[s].day + 1 > 2 }", "p.rego:4:19", "input.spend[_].day_micro_usd"),
    ("long if input.run.cost_usd * 2 > 1", "p.rego:4:9", "input.run.cost_micro_usd"),
    ("near if { t := data.lockgate.teams[input.principal.team]; t.monthly_budget_usd - 1 < 3 }",
     "p.rego:4:59", "monthly_budget_micro_usd"),
    ("big if { c := input.estimate.cost_usd_max; c > 1 }", "p.rego:4:44", "the *_micro_usd field"),
])
def test_float_money_is_a_warning_with_the_integer_field_to_use(rego: str, where: str, suggestion: str) -> None:
    vetting = vet_policy(source(rego))

    assert vetting.errors == []
    [warning] = [str(w) for w in vetting.warnings]
    assert warning.startswith(f"{where}: warning: ")
    assert "float dollars" in warning and suggestion in warning


def test_integer_money_and_the_shipped_policy_raise_nothing() -> None:
    assert vet_policy(source("big if input.estimate.cost_micro_usd_max > 500000\n"
                             'budget := {"limit_usd": 5}')).findings == []
    shipped = load_policy_source(ROOT / "policies", ())
    assert vet_policy(shipped, with_tests=True).findings == []


def test_a_parse_error_names_file_line_and_column() -> None:
    [error] = vet_policy(PolicySource(modules={"p.rego": HEAD + 'decision := {"allow": true\n'}, data={})).errors

    assert error.file == "p.rego" and error.line >= 4 and error.column > 0


def test_a_policy_the_engine_cannot_parse_in_time_is_refused_not_waited_for() -> None:
    nested = "[" * 40 + "]" * 40  # regorus takes exponential time on nested array literals
    [error] = vet_policy(source(f"x := {nested}"), timeout_s=3).errors

    assert str(error) == ("error: parsing the policy did not finish within 3 s (regorus takes exponential time on "
                          "deeply nested literals)")


def test_a_crash_the_guard_cannot_see_costs_one_input_only() -> None:
    # Literal bounds pass the guard; this one asks for terabytes, and regorus aborts its process.
    policy = source('boom := count(numbers.range(0, 1000000000000)) if input.request.metadata.boom\n'
                    'answer := {"n": boom} if input.request.metadata.boom else := {"ok": true}')
    inputs = [{"request": {"metadata": {}}}, {"request": {"metadata": {"boom": "1"}}}, {"request": {"metadata": {}}}]
    answers = list(evaluate_in_child(policy, [("data.lockgate.answer", i) for i in inputs]))

    assert [a.value for a in answers] == [{"ok": True}, None, {"ok": True}]
    assert answers[1].error is not None and "crashed the engine (signal" in answers[1].error


def test_a_crash_on_the_sample_input_is_a_refusal() -> None:
    vetting = vet_policy(PolicySource(modules={"p.rego": HEAD + 'decision := {"allow": count(numbers.range(0, '
                                                                '1000000000000)) > 0}\n'}, data={}))
    assert [str(e) for e in vetting.errors] == [
        "error: evaluating a sample input with the policy crashed the engine (signal 6)"]


def test_evaluation_refuses_an_unguarded_policy() -> None:
    with pytest.raises(ValueError, match="recursive rules"):
        list(evaluate_in_child(source("a := a"), [(DECISION, {})]))


def test_findings_are_json_lines_the_parent_can_read() -> None:
    finding = vet_policy(source("x := opa.runtime()")).errors[0]
    assert json.loads(json.dumps(finding.as_dict()))["line"] == 4
