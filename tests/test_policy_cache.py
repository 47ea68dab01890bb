"""Reused decisions: what a policy reads of its input, and that reuse never changes an answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import regorus

from gateway.policy import PolicyStage
from gateway.policy.cache import DecisionCache, input_reads
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.source import PolicySource

ROOT = Path(__file__).resolve().parents[1]


def reads(rules: str) -> Any:
    engine = regorus.Engine()
    engine.add_policy("p.rego", "package p\nimport rego.v1\n" + rules)
    return input_reads(json.loads(engine.get_ast_as_json()))


def stage(rules: str, data: dict[str, Any] | None = None, size: int = 16) -> PolicyStage:
    source = PolicySource(modules={"p.rego": "package lockgate\nimport rego.v1\n" + rules}, data=data or {})
    return PolicyStage(EmbeddedEngine(source), size)


def test_the_shipped_policy_reads_the_caller_model_tools_and_output_bound() -> None:
    """Never the prompt's estimate, the spend or the clock, which change with every call: the
    shipped policy's answer is reused for every call of a user with the same model, tools, and
    output bound (max_tokens, or the gateway's default, times n)."""
    engine = regorus.Engine()
    for module in sorted((ROOT / "policies").glob("*.rego")):
        if not module.name.endswith("_test.rego"):
            engine.add_policy(module.name, module.read_text())
    # may_approve's reads (approval, decider) and the reply review's (response) are never in a
    # call's input: they key nothing.
    assert input_reads(json.loads(engine.get_ast_as_json())) == (
        ("approval", "approvers"), ("decider", "team"), ("estimate", "output_tokens_max"),
        ("principal", "org"), ("principal", "team"), ("principal", "user"),
        ("request", "choices"), ("request", "model"), ("request", "tools"), ("response", "tool_calls"))


@pytest.mark.parametrize(("rules", "expected"), [
    ('a := input.request.model', (("request", "model"),)),
    ('a := input["principal"].team', (("principal", "team"),)),
    ('a := input.request.tools[0]', (("request", "tools"),)),  # a non-string index reads all of it
    ('a contains t if { some t in input.request.tools }', (("request", "tools"),)),
    ('a := data.teams[input.principal.team].models', (("principal", "team"),)),
    ('f(x) := x.y\na := f(input.z)', (("z",),)),
    ('a := input.request\nb := input.request.model', (("request",),)),  # the wider path covers the narrower
    ('a := count(input.request.messages) + input.spend.team.month',
     (("request", "messages"), ("spend", "team", "month"))),
])
def test_paths_read(rules: str, expected: Any) -> None:
    assert reads(rules) == expected


def test_an_import_of_part_of_the_input_reads_that_part() -> None:
    engine = regorus.Engine()
    engine.add_policy("p.rego", "package p\nimport rego.v1\nimport input.request as rq\na := rq.model\n")
    assert input_reads(json.loads(engine.get_ast_as_json())) == (("request",),)


@pytest.mark.parametrize("rules", [
    'a := walk(input)',  # input used whole
    'x := input\na := x.request.model',
    'a := object.get(input, "request", {})',
    'a := time.now_ns()',  # answers that change from call to call
    'a := rand.intn("x", 10)',
    'a := uuid.rfc4122("x")',
    'a if { print(input.request.model) }',
])
def test_policies_whose_answers_must_not_be_reused(rules: str) -> None:
    assert reads(rules) is None


def call(model: str, team: str = "research", spent: int = 0, now: str = "2026-12-02T00:00:00Z") -> dict[str, Any]:
    return {"principal": {"team": team, "user": "ana"}, "request": {"model": model, "tools": []},
            "spend": {"team": {"month_micro_usd": spent}}, "now": now}


ALLOW_BY_MODEL = 'default decision := {"allow": false}\ndecision := {"allow": true} if input.request.model == "fast"\n'


def test_an_input_that_differs_only_where_the_policy_does_not_look_reuses_the_answer() -> None:
    policy = stage(ALLOW_BY_MODEL)
    first = policy.decide(call("fast", now="2026-12-02T00:00:00Z"))
    again = policy.decide(call("fast", team="other", spent=999, now="2026-12-02T00:00:09Z"))
    assert first[0].allow and not first[2]
    assert again[:2] == first[:2] and again[2]
    other = policy.decide(call("slow"))
    assert not other[0].allow and not other[2]


def test_a_policy_reading_the_spend_sees_every_change_of_it() -> None:
    policy = stage('default decision := {"allow": false, "reasons": ["over"]}\n'
                   'decision := {"allow": true} if input.spend.team.month_micro_usd < 100\n')
    assert policy.decide(call("fast", spent=50))[0].allow
    assert policy.decide(call("fast", spent=50))[2]
    over = policy.decide(call("fast", spent=150))
    assert not over[0].allow and not over[2]


def test_a_policy_reading_the_clock_is_evaluated_every_time() -> None:
    policy = stage('decision := {"allow": time.now_ns() > 0}\n')
    assert policy.cache is None
    assert [policy.decide(call("fast"))[2] for _ in range(3)] == [False, False, False]


def test_a_missing_field_and_a_null_one_are_different_inputs() -> None:
    policy = stage('default decision := {"allow": false}\n'
                   'decision := {"allow": true} if { not input.request.model }\n')
    missing = {"request": {}}
    null = {"request": {"model": None}}
    assert policy.decide(missing)[0].allow
    assert policy.decide(null)[0].allow is False  # `not null` is false in Rego: null is defined
    assert policy.decide(null)[2] and policy.decide(missing)[2]


def test_errors_are_not_kept() -> None:
    from gateway.errors import PolicyFailed
    policy = stage('decision := {"allow": 1}\n')  # the wrong shape: an engine error, every time
    for _ in range(2):
        with pytest.raises(PolicyFailed):
            policy.decide(call("fast"))
    assert policy.cache is not None and len(policy.cache) == 0


def test_the_cache_keeps_the_most_recently_used_answers() -> None:
    cache = DecisionCache((("request", "model"),), size=2)
    keys = [cache.key({"request": {"model": m}}) for m in ("a", "b", "c")]
    assert None not in keys
    cache.put(keys[0], "A")  # type: ignore[arg-type]
    cache.put(keys[1], "B")  # type: ignore[arg-type]
    assert cache.get(keys[0]) == "A"  # type: ignore[arg-type]  # a is now the most recent
    cache.put(keys[2], "C")  # type: ignore[arg-type]
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == "A" and len(cache) == 2  # type: ignore[arg-type]


def test_size_zero_turns_reuse_off() -> None:
    policy = stage(ALLOW_BY_MODEL, size=0)
    assert policy.cache is None
    assert not policy.decide(call("fast"))[2] and not policy.decide(call("fast"))[2]
