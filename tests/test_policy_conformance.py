"""The oracle: the embedded engine (regorus) and OPA give the same answers, or differ exactly as
docs/policies.md ("Engine differences") says.

OPA here is the real OPA Go engine behind our REST shim (tests/fakes/opa_server.py), reached the
way the gateway reaches it: ``OpaEngine`` in push mode, over HTTP, through opa-python-client. So a
difference in how inputs and answers cross the wire would show up here too.

Two sets of cases:

- the shipped policies (whatever files the policies/ folder holds) on a varied set of inputs:
  every answer must agree;
- a corpus of small policies, each exercising one corner (strings, numbers, time, regex, sets,
  ``every``, ``with``...): each agrees, or is a known divergence listed in KNOWN_DIVERGENCES with
  both engines' answers, which the test holds them to, so that a fixed engine fails the test and
  tells us to update the docs.

A recursive policy crashes the process that evaluates it with regorus, so it is never evaluated
here: OPA refuses it at compile, and the gateway's load path (today the child-process preflight,
gateway/policy/preflight.py) refuses it for the embedded engine.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.policy import DECISION, MAY_APPROVE, RESPONSE_DECISION, build_input, parse_decision
from gateway.policy.embedded import EmbeddedEngine, PolicyEngineError
from gateway.policy.opa import OpaConfig, OpaEngine
from gateway.policy.preflight import run_preflight
from gateway.policy.source import PolicySource, load_policy_source
from gateway.settings import load_settings
from gateway.types import CallFacts, Principal
from tests.fakes.opa_server import OpaServer

ROOT = Path(__file__).resolve().parents[1]
ERROR = "<evaluation error>"  # either engine failed to evaluate (the gateway denies: 503 policy_error)
ALIASES = "data.lockgate.aliases"


@pytest.fixture(scope="module")
def opa() -> Iterator[OpaServer]:
    server = OpaServer().start()
    yield server
    server.stop()


def embedded_answers(source: PolicySource, queries: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    engine = EmbeddedEngine(source)
    answers = []
    for entrypoint, policy_input in queries:
        try:
            answers.append(engine.evaluate(entrypoint, policy_input))
        except PolicyEngineError:
            answers.append(ERROR)
    engine.close()
    return answers


def opa_answers(server: OpaServer, source: PolicySource, queries: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def ask() -> list[Any]:
        engine = OpaEngine(OpaConfig(url=server.url, mode="push", timeout_s=5.0), source)
        try:
            await engine.start()
            answers = []
            for entrypoint, policy_input in queries:
                try:
                    answers.append(await engine.evaluate_async(entrypoint, policy_input))
                except PolicyEngineError:
                    answers.append(ERROR)
            return answers
        finally:
            await engine.aclose()

    return asyncio.run(ask())


# --- the shipped policies ----------------------------------------------------------------------

def shipped_queries(source: PolicySource) -> list[tuple[str, dict[str, Any]]]:
    """Inputs across the teams, models, aliases and tools the data names, plus unknown ones, on
    several endpoints, with and without spend and a run; replies with tool calls; approvers."""
    data = source.data.get("lockgate", {})
    teams = [*sorted(data.get("teams", {})), "nobody", "Ré👍search"]
    models = [*sorted(data.get("catalog", {})), *sorted(data.get("aliases", {})), "gpt-unknown"]
    tools = [(), ("search_web",), *[(t,) for t in sorted(data.get("approval_tools", {}))], ("a", "b", "mcp:x")]
    endpoints = ["chat.completions", "responses", "messages", "embeddings"]
    spends: list[dict[str, Any]] = [{}, {"team:research": {"month": 99_999_999, "month_calls": 7}}]
    queries = []
    for index, (team, model, offered, endpoint) in enumerate(itertools.product(teams, models, tools, endpoints)):
        principal = Principal(key_id=f"k_{index}", user=f"u{index % 3}", team=team, org="acme",
                              roles=("approver",) if index % 2 else ())
        facts = CallFacts(endpoint=endpoint, model=model, stream=bool(index % 2), max_tokens=(None, 1, 800)[index % 3],
                          tools=offered, message_count=index % 5, metadata={"n": "٣"} if index % 7 == 0 else {},
                          input_tokens=index * 13, output_tokens_max=4096)
        policy_input = build_input(principal, facts, index * 1234, spends[index % 2], "2026-11-25T04:00:00Z",
                                   "run-1" if index % 5 == 0 else None)
        queries.append((DECISION, policy_input))
        if index % 4 == 0:
            queries.append((RESPONSE_DECISION, {**policy_input, "response": {
                "tool_calls": list(offered), "finish_reasons": ["tool_calls"]}}))
        if index % 6 == 0:
            queries.append((ALIASES, policy_input))
    for team, approvers in itertools.product(teams, [[], ["finance"], ["research", "support"]]):
        queries.append((MAY_APPROVE, {
            "approval": {"id": "ap_1", "requester": {"user": "dan", "team": "finance", "org": "acme", "key_id": "k"},
                         "endpoint": "chat.completions", "model": "mock-fast", "approvers": approvers},
            "decider": {"key_id": "k2", "user": "carol", "team": team, "org": "acme", "roles": ["approver"],
                        "labels": {}}}))
    return queries


def test_the_shipped_policies_decide_alike_in_both_engines(opa: OpaServer) -> None:
    source = load_policy_source(ROOT / "policies", load_settings(environ={}).models)
    engine = EmbeddedEngine(source)
    defined = {q for q in (DECISION, RESPONSE_DECISION, MAY_APPROVE) if engine.defines(q)} | {ALIASES}
    engine.close()
    queries = [(entrypoint, policy_input) for entrypoint, policy_input in shipped_queries(source)
               if entrypoint in defined]
    assert len(queries) > 400

    embedded, remote = embedded_answers(source, queries), opa_answers(opa, source, queries)

    differing = [(q, e, o) for q, e, o in zip(queries, embedded, remote, strict=True) if e != o]
    assert not differing, f"{len(differing)} answers differ; the first: {differing[0]}"
    assert any(isinstance(a, dict) and a.get("allow") is True for a in embedded)
    assert any(isinstance(a, dict) and a.get("allow") is False for a in embedded)


# --- the corpus --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    rego: str  # the body of package lockgate; the answer is data.lockgate.r
    input: dict[str, Any]


@dataclass(frozen=True)
class Divergence:
    embedded: Any  # what regorus answers
    opa: Any  # what OPA answers
    why: str  # as docs/policies.md, "Engine differences", explains it


CORPUS: dict[str, Case] = {
    "string_newlines_quotes": Case('r := sprintf("%s|%d", [input.s, count(input.s)])',
                                   {"s": 'line one\nline "two"\t\\ \'three\''}),
    "string_concat_split": Case('r := split(concat("\\n", input.xs), "\\n")', {"xs": ["a\"b", "ç", "", "👍"]}),
    "count_emoji": Case("r := count(input.s)", {"s": "héllo👍🏽"}),
    "count_emoji_family": Case("r := count(input.s)", {"s": "👨‍👩‍👧"}),
    "indexof_after_emoji": Case('r := indexof(input.s, "a")', {"s": "👍🏽abc"}),
    "substring_after_emoji": Case("r := substring(input.s, 1, 3)", {"s": "👍🏽abc"}),
    "upper_sharp_s": Case("r := upper(input.s)", {"s": "straße ﬁ"}),
    "lower_non_ascii": Case("r := lower(input.s)", {"s": "ÀÉÎ İ"}),
    "to_number_ascii": Case('r := to_number("1234.5")', {}),
    "to_number_arabic_digits": Case("r := to_number(input.s)", {"s": "١٢٣"}),
    "regex_digit_ascii": Case("r := regex.match(`^\\d+$`, input.s)", {"s": "123"}),
    "regex_digit_arabic": Case("r := regex.match(`^\\d+$`, input.s)", {"s": "١٢٣"}),
    "regex_digit_devanagari": Case("r := regex.match(`\\d`, input.s)", {"s": "४२"}),
    "regex_word_non_ascii": Case("r := regex.match(`^\\w+$`, input.s)", {"s": "café"}),
    "regex_find_emoji": Case('r := regex.find_n(`[a-z]+`, input.s, -1)', {"s": "ab👍cd"}),
    "money_literal_sum": Case("r := 0.6 + 0.3 >= 0.9", {}),
    "money_literal_value": Case("r := 0.1 + 0.2", {}),
    "money_input_sum": Case("r := input.a + input.b >= 0.9", {"a": 0.6, "b": 0.3}),
    "money_micro_usd": Case("r := input.a + input.b >= 900000", {"a": 600000, "b": 300000}),
    "money_budget_compare": Case("r := input.spent + input.cost <= input.limit",
                                 {"spent": 99.7, "cost": 0.3, "limit": 100}),
    "integer_division": Case("r := [7 / 2, 6 / 3, 1 / 3]", {}),
    "big_integer": Case("r := input.n + 1", {"n": 9007199254740993}),
    "int_float_equal": Case("r := [3 == 3.0, input.x == 2]", {"x": 2.0}),
    "round_half": Case("r := [round(2.5), round(-2.5), ceil(1.2), floor(-1.2)]", {}),
    "time_parse_rfc3339": Case("r := time.parse_rfc3339_ns(input.now)", {"now": "2026-11-25T04:00:00Z"}),
    "time_parse_offset": Case("r := time.parse_rfc3339_ns(input.now)", {"now": "2026-11-25T05:30:00.123+01:30"}),
    "time_date_clock_weekday": Case("t := time.parse_rfc3339_ns(input.now)\n"
                                    "r := [time.date(t), time.clock(t), time.weekday(t)]",
                                    {"now": "2024-02-29T23:59:59Z"}),
    "time_add_date": Case("r := time.add_date(time.parse_rfc3339_ns(input.now), 0, 1, 0)",
                          {"now": "2026-01-31T00:00:00Z"}),
    "time_diff": Case('r := time.diff(time.parse_rfc3339_ns("2026-03-01T00:00:00Z"), '
                      'time.parse_rfc3339_ns("2024-02-29T12:00:00Z"))', {}),
    "time_parse_duration": Case('r := time.parse_duration_ns("1h30m")', {}),
    "time_now_is_a_number": Case("r := is_number(time.now_ns())", {}),
    "sets_ops": Case('s := {x | some x in input.xs}\nr := [s | {"z"}, s & {"a", "q"}, s - {"a"}, count(s)]',
                     {"xs": ["a", "b", "a", "ç"]}),
    "set_sorted": Case("r := sort({x | some x in input.xs})", {"xs": ["b", "B", "a", "é", "e", "10", "9"]}),
    "every_true": Case('default r := false\nr if { every x in input.xs { startswith(x, "a") } }',
                       {"xs": ["ab", "ac"]}),
    "every_false": Case('default r := false\nr if { every x in input.xs { startswith(x, "a") } }',
                        {"xs": ["ab", "b"]}),
    "every_empty": Case('default r := false\nr if { every x in input.xs { x == "never" } }', {"xs": []}),
    "with_input": Case("q := input.n * 2\nr := [q, y] if { y := q with input.n as 5 }", {"n": 1}),
    "with_data": Case("q := data.lockgate.conf_limit\nr := y if { y := q with data.lockgate.conf_limit as 7 }", {}),
    "object_get_key": Case('r := object.get(input.o, "missing", "d")', {"o": {"a": 1}}),
    "object_get_path": Case('r := [object.get(input, ["o", "a", "b"], "d"), object.get(input, ["o", "x"], "d")]',
                            {"o": {"a": {"b": 0}}}),
    "object_get_null": Case('r := object.get(input.o, "a", "d")', {"o": {"a": None}}),
    "sprintf_mixed": Case('r := sprintf("%v|%d|%s|%.2f|%x", [input.o, 42, "é", 0.125, 255])',
                          {"o": {"b": 1, "a": [1]}}),
    "sprintf_float_v": Case('r := sprintf("%v", [0.1 + 0.2])', {}),
    "sprintf_big_v": Case('r := sprintf("%v", [input.n])', {"n": 1e21}),
    "json_marshal_order": Case('r := json.marshal({"b": 1, "a": [1, "é"]})', {}),
    "undefined_rule": Case("r := input.absent.deeper", {}),
    "conflict_is_an_error": Case("r := 1 if input.x\nr := 2 if input.x", {"x": True}),
    "type_error": Case("r := input.s + 1", {"s": "one"}),
    "comprehension_over_object": Case("r := {k: count(v) | some k, v in input.o}", {"o": {"é": "👍🏽", "b": ""}}),
    "array_slice": Case("r := array.slice(input.xs, 1, 10)", {"xs": [1, 2, 3]}),
    "string_compare_non_ascii": Case('r := ["é" > "z", "Z" < "a", "10" < "9"]', {}),
}

_FLOAT = "regorus computes in binary floats (f64); OPA in exact decimals"
_COUNT = "regorus's count() of a string counts UTF-16 code units; OPA's counts code points"
_REGEX = "regorus's regex (Rust) gives \\d and \\w their Unicode meaning; OPA's (Go RE2) matches ASCII only"
_CASE = "regorus maps case by Unicode's full rules (Rust); OPA by Go's one-rune mapping"

KNOWN_DIVERGENCES: dict[str, Divergence] = {
    "money_literal_sum": Divergence(False, True, _FLOAT),
    "money_literal_value": Divergence(0.30000000000000004, 0.3, _FLOAT),
    "money_input_sum": Divergence(False, True, _FLOAT + "; input numbers too (OPA reads JSON numbers exactly)"),
    "sprintf_float_v": Divergence("0.30000000000000004", "0.3", _FLOAT),
    "sprintf_mixed": Divergence('{"a": [1], "b": 1}|42|é|0.13|ff', '{"a": [1], "b": 1}|42|é|0.12|ff',
                                "%.2f of 0.125: regorus rounds half up, OPA (Go) half to even"),
    "sprintf_big_v": Divergence("1000000000000000000000", "1e+21", "%v of a large number: Go writes an exponent"),
    "count_emoji": Divergence(9, 7, _COUNT),
    "count_emoji_family": Divergence(8, 5, _COUNT),
    "comprehension_over_object": Divergence({"b": 0, "é": 4}, {"b": 0, "é": 2}, _COUNT),
    "regex_digit_arabic": Divergence(True, False, _REGEX),
    "regex_digit_devanagari": Divergence(True, False, _REGEX),
    "regex_word_non_ascii": Divergence(True, False, _REGEX),
    "upper_sharp_s": Divergence("STRASSE FI", "STRAßE ﬁ", _CASE),
    "lower_non_ascii": Divergence("àéî i̇", "àéî i", _CASE),
    "time_add_date": Divergence(1772236800000000000, 1772496000000000000,
                                "adding a month to Jan 31: regorus clamps to Feb 28, OPA (Go) rolls over to Mar 3"),
    "sets_ops": Divergence([{"a", "b", "z", "ç"}, {"a"}, {"b", "ç"}, 3], [["a", "b", "z", "ç"], ["a"], ["b", "ç"], 3],
                           "a set in an answer reaches the gateway as a Python set from regorus, as a JSON array "
                           "from OPA; a decision's arrays of strings (reasons, approvers, fallbacks) may be sets "
                           "and are read as sorted arrays, so the decisions agree"),
}


def corpus_source(case: Case) -> PolicySource:
    module = f'package lockgate\nimport rego.v1\ndecision := {{"allow": true}}\n{case.rego}\n'
    return PolicySource(modules={"corpus.rego": module}, data={})


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_case_agrees_or_diverges_as_documented(opa: OpaServer, name: str) -> None:
    case = CORPUS[name]
    source = corpus_source(case)
    queries = [("data.lockgate.r", case.input)]
    [embedded] = embedded_answers(source, queries)
    [remote] = opa_answers(opa, source, queries)

    known = KNOWN_DIVERGENCES.get(name)
    if known is None:
        assert embedded == remote, f"the engines differ on {name}: embedded {embedded!r}, OPA {remote!r}"
    else:
        assert (embedded, remote) == (known.embedded, known.opa), (
            f"{name} no longer diverges as documented (embedded {embedded!r}, OPA {remote!r}): update "
            "KNOWN_DIVERGENCES and docs/policies.md, 'Engine differences'")


def test_every_known_divergence_is_a_case_and_is_documented() -> None:
    docs = (ROOT / "docs" / "policies.md").read_text()
    section = docs[docs.index("## Engine differences"):]
    for name in KNOWN_DIVERGENCES:
        assert name in CORPUS
        assert f"`{name}`" in section, f"docs/policies.md, 'Engine differences', does not list {name}"


RECURSIVE = ('package lockgate\nimport rego.v1\ndecision := {"allow": count(loop) == 0}\n'
             "loop contains x if { some x in loop }\n")


def test_a_recursive_policy_is_refused_by_both_load_paths(opa: OpaServer) -> None:
    """Never evaluated by regorus in this process: it would crash it."""
    source = PolicySource(modules={"corpus.rego": RECURSIVE}, data={})
    with pytest.raises(PolicyEngineError, match="rego_recursion_error"):
        opa_answers(opa, source, [])
    # The embedded engine's load path: the load-time guard finds the cycle in the rule graph before
    # anything is evaluated (gateway/policy/guard.py, run in the preflight child).
    with pytest.raises(ValueError, match="recursive rules are not allowed"):
        run_preflight(source)


def test_a_set_where_the_decision_wants_an_array_of_strings_is_read_alike_from_both_engines(opa: OpaServer) -> None:
    rego = ('package lockgate\nimport rego.v1\n'
            'decision := {"allow": false, "reasons": {r | some r in ["b", "a", "b"]},\n'
            '             "route": {"fallbacks": {"mock-smart", "mock-fast"}}}\n')
    source = PolicySource(modules={"corpus.rego": rego}, data={})
    embedded = EmbeddedEngine(source)
    try:
        mine = parse_decision(embedded.evaluate(DECISION, {}))
    finally:
        embedded.close()
    [theirs] = opa_answers(opa, source, [(DECISION, {})])
    assert mine == parse_decision(theirs)
    assert mine.reasons == ("a", "b") and mine.fallbacks == ("mock-fast", "mock-smart")
